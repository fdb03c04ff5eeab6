"""Exact scaling: every product rounded once, half away from zero, checked against a 200-digit decimal oracle."""

from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import pytest

from money import scale
from tests.world import expected


@pytest.mark.parametrize(
    ("amount", "factor", "want"),
    [
        ("0.01", Fraction(3, 2), "0.02"),  # 0.015: half goes away from zero
        ("-0.01", Fraction(3, 2), "-0.02"),
        ("0.01", Fraction(-1, 2), "-0.01"),  # -0.005
        ("0.03", Fraction(1, 2), "0.02"),  # 0.015
        ("100.00", Fraction(1, 3), "33.33"),
        ("200.00", Fraction(1, 3), "66.67"),
        ("0.00", Fraction(7, 3), "0.00"),
    ],
)
def test_known_halves_and_thirds(amount: str, factor: Fraction, want: str) -> None:
    assert scale(Decimal(amount), factor) == Decimal(want)


def test_random_products_match_the_decimal_oracle() -> None:
    rng = random.Random(20261128)
    for _ in range(5000):
        amount = Decimal(rng.randint(-(10**12), 10**12)).scaleb(-2)
        pool = Decimal(rng.randint(1, 10**17)).scaleb(-rng.randint(0, 8))
        market = Decimal(rng.randint(0, 10**17)).scaleb(-rng.randint(0, 8))
        factor = Fraction(market) / Fraction(pool)
        assert scale(amount, factor) == expected(amount, (str(market), str(pool))), (amount, pool, market)
