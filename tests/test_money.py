"""Exact compounding in consistency.compound: each step rounded once, half away from zero, checked against a
200-digit decimal oracle, stopping before a step that cannot be stored."""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import pytest

from tests.world import World, expected


def compound(
    world: World, amounts: list[Decimal], factors: list[Fraction], k: int
) -> tuple[list[Decimal], int, str | None]:
    """Run consistency.compound on three amounts; return the amounts, steps applied and the problem."""
    ((result, applied, problem),) = world.p(
        "SELECT result, applied, problem FROM consistency.compound(%s::numeric[], %s::numeric[], %s::numeric[], %s)",
        (amounts, [f.numerator for f in factors], [f.denominator for f in factors], k),
    )
    return result, applied, problem


@pytest.mark.parametrize(
    ("amount", "factor", "want"),
    [
        ("0.01", Fraction(3, 2), "0.02"),  # 0.015: half goes away from zero
        ("0.03", Fraction(1, 2), "0.02"),  # 0.015
        ("0.01", Fraction(1, 2), "0.01"),  # 0.005
        ("0.01", Fraction(1, 3), "0.00"),
        ("100.00", Fraction(1, 3), "33.33"),
        ("200.00", Fraction(1, 3), "66.67"),
        ("0.00", Fraction(7, 3), "0.00"),
        ("0.00", Fraction(-1, 2), "0.00"),  # zero stays zero, whatever the sign of the factor
    ],
)
def test_known_halves_and_thirds(world: World, amount: str, factor: Fraction, want: str) -> None:
    result, applied, problem = compound(world, [Decimal(amount)] * 3, [factor] * 3, 1)
    assert (result, applied, problem) == ([Decimal(want)] * 3, 1, None)


def test_random_products_match_the_decimal_oracle(world: World) -> None:
    rng = random.Random(20261128)
    cases = []
    for _ in range(3000):
        amount = Decimal(rng.randint(0, 10**12)).scaleb(-2)
        pool = Decimal(rng.randint(1, 10**17)).scaleb(-rng.randint(0, 8))
        market = Decimal(rng.randint(0, 10**17)).scaleb(-rng.randint(0, 8))
        if market / pool < 2:  # below the overflow limit for any amount here
            cases.append((amount, Fraction(market) / Fraction(pool), market, pool))
    got = world.p(
        "SELECT (consistency.compound(ARRAY[a, 0, 0], ARRAY[n, 1, 1], ARRAY[d, 1, 1], 1)).result[1]"
        " FROM unnest(%s::numeric[], %s::numeric[], %s::numeric[]) AS c(a, n, d)",
        ([c[0] for c in cases], [c[1].numerator for c in cases], [c[1].denominator for c in cases]),
    )
    want = [expected(amount, (str(market), str(pool))) for amount, _, market, pool in cases]
    assert [row[0] for row in got] == want
    assert len(want) > 1000


def test_each_step_is_rounded_before_the_next(world: World) -> None:
    factors = [Fraction(1030000, 1000000), Fraction(1990000, 2000000), Fraction(512500, 500000)]
    start = [Decimal("1000.05"), Decimal("2000.00"), Decimal("3000.15")]

    result, applied, problem = compound(world, start, factors, 10)

    steps = [(str(f.numerator), str(f.denominator)) for f in factors]
    assert result == [expected(a, *[s] * 10) for a, s in zip(start, steps, strict=True)]
    assert (applied, problem) == (10, None)


def test_it_stops_before_a_negative_result(world: World) -> None:
    start = [Decimal("10.00"), Decimal("0.00"), Decimal("5.00")]
    result, applied, problem = compound(world, start, [Fraction(1, 2), Fraction(1), Fraction(-1, 2)], 3)
    assert (result, applied, problem) == (start, 0, "result would be negative")


def test_it_stops_before_the_step_that_would_overflow(world: World) -> None:
    start = [Decimal("3000000000000.00"), Decimal("0.00"), Decimal("0.00")]  # 3e12; the sum must stay < 1e13

    result, applied, problem = compound(world, start, [Fraction(2), Fraction(1), Fraction(1)], 5)

    assert (applied, problem) == (1, "result would overflow NUMERIC(15,2)")
    assert result == [Decimal("6000000000000.00"), Decimal("0.00"), Decimal("0.00")]


def test_the_trail_agrees_with_compound_at_every_step_scale_included(world: World) -> None:
    # compound_trail, which the apply runs, against consistency.compound run for 0, 1, ..., k steps: the same
    # amounts written the same way (text compares the scale too), the same stop and the same problem.
    rng = random.Random(20261204)
    cases = []
    for _ in range(400):
        amounts = [str(Decimal(rng.randint(-10, 10**13)).scaleb(-2)) for _ in range(3)]
        factors = [Fraction(rng.randint(-2, 10**9), rng.randint(1, 10**9)) for _ in range(3)]
        cases.append((amounts, [str(f.numerator) for f in factors], [str(f.denominator) for f in factors]))
    for amounts, numerators, denominators in cases:
        k = rng.randint(0, 4)
        ((trail, applied, problem, after1, after2, after3),) = world.p(
            "SELECT result::text, applied, problem, after1::text[], after2::text[], after3::text[]"
            " FROM consistency.compound_trail(%s::numeric[], %s::numeric[], %s::numeric[], %s)",
            (amounts, numerators, denominators, k),
        )
        steps = world.p(
            "SELECT (c).result::text, (c).applied, (c).problem FROM generate_series(0, %s) AS i,"
            " LATERAL (SELECT consistency.compound(%s::numeric[], %s::numeric[], %s::numeric[], i) AS c) AS s"
            " ORDER BY i",
            (k, amounts, numerators, denominators),
        )
        assert (trail, applied, problem) == steps[k]
        assert [f"{{{a},{b},{c}}}" for a, b, c in zip(after1, after2, after3, strict=True)] == [
            step[0] for step in steps[1 : applied + 1]
        ]
