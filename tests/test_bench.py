"""The benchmark's traffic shapes draw what they say, and the lean bound follows the service's rules on them."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg2

from bench import http, versus
from bench.approaches import lean
from bench.backlogs import add_entries, busiest_share, drain_in_process, entries_sql, parked_of, shape_params
from bench.data import TIERS, snapshot
from devkit import ROOT, postgres


def drawn(pg: str, shape: str, count: int, select: str) -> list[tuple]:
    """Run a SELECT over a shape's entries (FROM entries) and return its rows."""
    conn = psycopg2.connect(pg)
    with conn.cursor() as cur:
        cur.execute(f"WITH entries AS ({entries_sql(shape)}) {select}", shape_params(count, datetime.now(UTC)))
        rows = cur.fetchall()
    conn.close()
    return rows


def test_the_mixed_shape_settles_80_10_10_and_parks_the_few_it_counts(pg: str) -> None:
    shares = dict(drawn(pg, "mixed", 20_000, "SELECT status, count(*) / 20000.0::float8 FROM entries GROUP BY status"))
    assert abs(shares["COMPLETED"] - 0.8) < 0.02 and abs(shares["FAILED"] - 0.1) < 0.02
    [(lost, moved)] = drawn(pg, "mixed", 20_000, "SELECT count(*) FILTER (WHERE lost), count(*) FILTER "
                                                 "(WHERE account <> owner AND NOT lost) FROM entries")  # fmt: skip
    assert lost + moved == parked_of("mixed", 20_000) == 4


def test_the_interleaved_shape_spreads_each_account_over_the_whole_backlog(pg: str) -> None:
    [(accounts, first, last)] = drawn(pg, "interleaved", 2000, "SELECT count(DISTINCT account), min(n), max(n) "
                                      "FROM entries WHERE account = '1000000007'")  # fmt: skip
    assert (accounts, first, last) == (1, 7, 1807)


def test_one_percent_of_the_skewed_accounts_carry_about_half_the_entries(pg: str) -> None:
    assert 0.45 < busiest_share(pg, "skewed", 200_000) < 0.6


def test_the_lean_bound_leaves_what_the_service_leaves_on_the_mixed_shape(pg: str) -> None:
    names = [postgres.create_template(pg, "bench_test_q", ROOT / "schema" / "queue_db.sql"),
             postgres.create_template(pg, "bench_test_p", ROOT / "schema" / "user_portfolio_db.sql")]  # fmt: skip
    try:
        add_entries(*(postgres.with_database(pg, name) for name in names), "mixed", 2000, datetime.now(UTC))
        names += [postgres.clone(pg, name) for name in names]
        quri, puri, bound_quri, bound_puri = (postgres.with_database(pg, name) for name in names)
        drain_in_process(quri, puri, 2000, parked=2)
        lean(bound_quri, bound_puri, TIERS)
        assert snapshot(puri) == snapshot(bound_puri)
    finally:
        for name in names:
            postgres.drop(pg, name)


def test_the_versus_table_sets_each_sides_median_beside_the_other() -> None:
    rounds = {"v1": [(1, 10), (9, 90), (2, 20)], "this": [(3, 30), (4, 40), (99, 9)]}  # medians 2 and 20, 4 and 30
    kinds = ("paced", "saturated")
    loads = {f"{side} {path} {kind}": [http.Load(1000, 0, 1.0, p50, p99) for p50, p99 in figures]
             for path in versus.PATHS for kind in kinds for side, figures in rounds.items()}  # fmt: skip
    rows = versus.table(loads, "v1").splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| {p} {k}" for p in versus.PATHS for k in kinds]
    assert all(row.endswith("| 2.00 | 4.00 | 2.00 | 20.00 | 30.00 | 1.50 | 0 |") for row in rows)
