"""The reads an operator needs, at the service: every drift check, the parked entries a filter matches, and why a
portfolio shows what it does; each paged, and read along an index however large its table grows."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg2
import pytest

import parked
import portfolios
from db import pg_array
from domain import DRIFT_KINDS
from drift import DriftChecks
from parked import ParkedFilter, ParkedPosition
from queries import query
from service import Service
from tests.world import World, expected

ACCOUNT, OTHER, NO_PORTFOLIO = "4000000001", "4000000002", "4999999999"
PRICES = {"TIER1_MV": Decimal("1100000"), "TIER2_MV": Decimal("1900000")}  # tier 1 up 10%, tier 2 down 5%
INVEST = (("11", "10"), ("19", "20"), ("1", "1"))
WITHDRAW = (("9", "10"), ("21", "20"), ("1", "1"))
T0 = datetime(2026, 12, 1, 22, 0, 0, 123456, tzinfo=UTC)


# Helpers ----------------------------------------------------------------------------------------------------------


def plan_nodes(plan: dict) -> list[dict]:
    """Flatten an EXPLAIN (FORMAT JSON) plan into its nodes."""
    return [plan, *(node for child in plan.get("Plans", []) for node in plan_nodes(child))]


def explained(uri: str, name: str, params: dict, page_plan: bool = False) -> list[dict]:
    """Run a named statement under EXPLAIN ANALYZE, as the service runs it (without JIT); return the plan's nodes."""
    conn = psycopg2.connect(uri, options="-c jit=off")
    try:
        with conn.cursor() as cur:
            if page_plan:
                cur.execute(query("page_plan"))
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query(name), params)
            return plan_nodes(cur.fetchone()[0][0]["Plan"])
    finally:
        conn.close()


def indexes_read(nodes: list[dict]) -> set[str]:
    """The indexes a plan read; it must read no table whole."""
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan" and n["Actual Rows"]], nodes
    return {n["Index Name"] for n in nodes if "Index Name" in n}


def rows_touched(nodes: list[dict]) -> int:
    """The most rows any node of a plan handled."""
    return max(n["Actual Rows"] * n["Actual Loops"] for n in nodes)


def walk(read, limit: int, key: str = "next_before") -> list[dict]:
    """Read pages until the last; return them."""
    pages, position = [], None
    while True:
        pages.append(read(limit, position))
        position = pages[-1][key]
        if position is None:
            return pages
        if key == "next_after":
            position = ParkedPosition.parse(position)
        assert len(pages) < 100


# Drift checks -----------------------------------------------------------------------------------------------------


def stored_check(world: World, counts: str = "{}", state: str = "done") -> int:
    """A check stored as an earlier release stored it: its counts as they were then."""
    return world.p(
        "INSERT INTO consistency.drift_checks (started_by, state, counts, finished_at)"
        " VALUES ('schedule', %s, %s, now()) RETURNING id",
        (state, counts),
    )[0][0]


def run_check(checks: DriftChecks, reason: str) -> int:
    """Start a check by hand and run it to its end in this thread; return its id."""
    started = checks.request("tester", reason)
    assert checks.run_due() == started["id"]
    return started["id"]


def test_drift_checks_page_newest_first_each_with_every_kind_counted(svc: Service, world: World) -> None:
    old = stored_check(world, '{"unapplied_entry": 2}')  # before the other kinds existed
    ids = [old, *(run_check(svc.drift, f"check {n}") for n in range(4))]

    pages = walk(svc.drift.page, 2)

    assert [len(p["entries"]) for p in pages] == [2, 2, 1]
    seen = [c for p in pages for c in p["entries"]]
    assert [c["id"] for c in seen] == ids[::-1]
    assert [p["next_before"] for p in pages] == [ids[3], ids[1], None]
    assert set(seen[0]) == {"id", "started_by", "reason", "state", "started_at", "finished_at", "rows_read", "error",
                            "counts"}  # fmt: skip
    assert (seen[0]["started_by"], seen[0]["reason"], seen[0]["state"]) == ("tester", "check 3", "done")
    assert seen[-1]["counts"] == {**dict.fromkeys(DRIFT_KINDS, 0), "unapplied_entry": 2}
    assert svc.drift.page(10, old) == {"entries": [], "next_before": None}


def test_a_report_by_id_is_the_report_latest_gives_and_none_for_an_unknown_id(svc: Service, world: World) -> None:
    old = stored_check(world, '{"changed_entry": 1}')
    world.p(
        "INSERT INTO consistency.drift_findings (check_id, kind, queue, queue_id, uuid, account_number, detail)"
        " VALUES (%s, 'changed_entry', 'investment', 7, 'u-7', %s, '{\"queue_row\": \"gone\"}')",
        (old, ACCOUNT),
    )
    newest = run_check(svc.drift, "after the restore")

    assert svc.drift.report(newest) == svc.drift.latest()
    report = svc.drift.report(old)
    assert report["id"] == old and report["counts"] == {**dict.fromkeys(DRIFT_KINDS, 0), "changed_entry": 1}
    assert [(f["kind"], f["queue_id"], f["detail"]) for f in report["findings"]] == [
        ("changed_entry", 7, {"queue_row": "gone"})
    ]
    assert report["findings_kept_per_kind"] == 1000 and "positions" in report
    assert svc.drift.report(newest + 1) is None


def test_the_drift_reads_go_along_their_primary_keys(world: World, dbs) -> None:
    world.p("ANALYZE consistency.drift_checks")  # while nearly empty: the statistics are stale once loaded
    world.p(
        "INSERT INTO consistency.drift_checks (started_by, state, counts)"
        " SELECT 'schedule', 'done', '{}' FROM generate_series(1, 3000)"
    )
    newest = world.p("SELECT max(id) FROM consistency.drift_checks")[0][0]
    page = explained(dbs[1], "list_drift_checks", {"before": newest - 100, "limit": 11})
    assert indexes_read(page) == {"drift_checks_pkey"} and rows_touched(page) == 11
    for check in (newest - 5, None):
        report = explained(dbs[1], "drift_check", {"id": check})
        assert indexes_read(report) == {"drift_checks_pkey"} and rows_touched(report) == 1
    findings = explained(dbs[1], "drift_findings_of", {"check_id": newest})
    assert indexes_read(findings) == {"drift_findings_pkey"}


# Parked entries ---------------------------------------------------------------------------------------------------


def stored_parkings(world: World) -> list[tuple]:
    """Every parked entry as (parked_at, queue, queue_id, account, reason), in the listing's order."""
    return sorted(world.p("SELECT parked_at, queue, queue_id, account_number, reason FROM consistency.parked_entries"))


def listed(pages: list[dict]) -> list[tuple]:
    """The entries of pages as (queue, queue_id), in order."""
    return [(e["queue"], e["queue_id"]) for p in pages for e in p["entries"]]


def matching(stored: list[tuple], where: ParkedFilter) -> list[tuple]:
    """The oracle: the stored parkings a filter matches, as (queue, queue_id), in the listing's order."""
    return [
        (queue, queue_id)
        for _, queue, queue_id, account, reason in stored
        if where.queue in (None, queue) and where.account in (None, account) and (where.reason or "") in reason
    ]


def park(world: World, rows: list[tuple[datetime, str, int, str, str]]) -> None:
    """Park entries directly, as (parked_at, queue, queue_id, account, reason), as a cycle would have parked them."""
    world.p(
        "INSERT INTO consistency.parked_entries (queue, queue_id, uuid, account_number, status, updated_at, reason,"
        " parked_at) SELECT q, i, md5(i::text), a, 'COMPLETED', t, r, t"
        " FROM unnest(%s::timestamptz[], %s::text[], %s::integer[], %s::text[], %s::text[]) AS e(t, q, i, a, r)",
        tuple(pg_array(column) for column in zip(*rows, strict=True)),
    )


@pytest.fixture
def parkings(svc: Service, world: World) -> list[tuple]:
    """Entries parked by a cycle for three reasons, in both queues and for two accounts."""
    world.portfolio_for(OTHER)
    world.request("investment", NO_PORTFOLIO, txn=False)
    world.request("withdrawal", NO_PORTFOLIO, txn=False)
    world.request("investment", OTHER, txn=False)
    world.request("withdrawal", OTHER, "FAILED", txn=False)
    world.finish(world.enqueue("investment", OTHER, "not-a-uuid", txn=False))
    world.finish(world.enqueue("withdrawal", OTHER, "not-a-uuid-either", txn=False), "CANCELLED")
    assert svc.runner.run().outcome == "ok"
    stored = stored_parkings(world)
    assert len(stored) == 6
    return stored


def test_parked_filters_alone_and_together_as_the_bulk_actions_read_them(svc: Service, parkings) -> None:
    combinations = itertools.product(
        (None, "withdrawal"), (None, OTHER), (None, "no portfolio", "valid", "Valid", "transaction with")
    )
    for queue, account, reason in combinations:
        where = ParkedFilter(queue, account, reason)
        answer = svc.parked_page(where, 100)
        assert listed([answer]) == matching(parkings, where), where
        assert (answer["filter"], answer["more"], answer["next_after"]) == (where.shown(), False, None)
    (first, *_) = svc.parked_page(ParkedFilter(), 100)["entries"]
    assert set(first) == {"queue", "queue_id", "uuid", "account_number", "status", "reason", "attempts", "parked_at",
                          "last_attempt_at"}  # fmt: skip
    assert [e["status"] for e in svc.parked_page(ParkedFilter(reason="valid"), 100)["entries"]] == [
        "COMPLETED",
        "CANCELLED",
    ]


def test_pages_follow_each_other_while_entries_are_parked_meanwhile(svc: Service, world: World, parkings) -> None:
    pages = [svc.parked_page(ParkedFilter(), 2)]
    world.request("investment", NO_PORTFOLIO, txn=False)  # parked after the first page was read
    assert svc.runner.run().outcome == "ok"  # and every parked entry retried: attempts change, positions do not
    while pages[-1]["next_after"] is not None:
        pages.append(svc.parked_page(ParkedFilter(), 2, ParkedPosition.parse(pages[-1]["next_after"])))

    assert listed(pages) == matching(stored_parkings(world), ParkedFilter())
    assert listed(pages)[:6] == matching(parkings, ParkedFilter())  # those parked before, each once, in order
    assert [len(p["entries"]) for p in pages] == [2, 2, 2, 1] and pages[0]["more"] and not pages[-1]["more"]


@pytest.mark.parametrize("limit", [1, 2, 3, 7])
def test_entries_parked_at_the_same_moment_in_both_queues_are_paged_in_key_order(world: World, svc, limit) -> None:
    at = [T0, T0 + timedelta(microseconds=1), T0 + timedelta(seconds=1)]
    rows = [(at[n % 3], ("investment", "withdrawal")[n % 2], 100 - n, ACCOUNT, "held") for n in range(14)]
    park(world, rows)

    pages = walk(lambda lim, after: svc.parked_page(ParkedFilter(), lim, after), limit, "next_after")

    assert listed(pages) == matching(stored_parkings(world), ParkedFilter())
    assert all(len(p["entries"]) == limit for p in pages[:-1])


def test_a_reason_filter_reads_a_bounded_range_per_page_and_says_where_it_stopped(
    world: World, svc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parked, "PARKED_SCAN", 3)
    rows = [
        (T0 + timedelta(seconds=n), "investment", n, ACCOUNT, "needle" if n in (3, 9) else "hay") for n in range(1, 11)
    ]
    park(world, [*rows, (T0, "withdrawal", 1, OTHER, "hay"), (T0 + timedelta(hours=1), "withdrawal", 2, OTHER, "hay")])

    pages = walk(lambda lim, after: svc.parked_page(ParkedFilter(reason="needle"), lim, after), 2, "next_after")

    # Three entries per queue and page at most: the needles come out in order, some pages hold none.
    assert listed(pages) == [("investment", 3), ("investment", 9)]
    assert [len(p["entries"]) for p in pages] == [1, 0, 1, 0]
    assert [p["more"] for p in pages] == [True, True, True, False]
    assert pages[0]["next_after"] == ParkedPosition(T0 + timedelta(seconds=3), "investment", 3).token()


def test_a_position_reads_back_as_it_was_shown() -> None:
    position = ParkedPosition(T0, "withdrawal", 2147483647)
    assert position.token() == "2026-12-01T22:00:00.123456Z~withdrawal~2147483647"
    assert ParkedPosition.parse(position.token()) == position


@pytest.mark.parametrize(
    "token",
    [
        "",
        "2026-12-01T22:00:00Z~investment~1",
        "2026-13-01T22:00:00.000000Z~investment~1",
        "2026-12-01T22:00:00.000000Z~savings~1",
        "2026-12-01T22:00:00.000000Z~investment~2147483648",
        "2026-12-01T22:00:00.000000+00:00~investment~1",
    ],
)
def test_a_position_it_did_not_show_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match=r"^after: must be a position"):
        ParkedPosition.parse(token)


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"queue": "savings"}, "queue"), ({"account": " "}, "account"), ({"reason": "x" * 501}, "reason")],
)
def test_a_filter_no_parked_entry_could_match_is_refused(fields: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        ParkedFilter(**fields)


def test_every_parked_filter_is_read_along_an_index_however_stale_the_statistics(world: World, dbs) -> None:
    world.p("ANALYZE consistency.parked_entries")  # while empty: once loaded, the table looks empty to the planner
    park(world, [(T0 + timedelta(seconds=n // 7), ("investment", "withdrawal")[n % 2], n, f"40000{n % 40:05d}", "hay")
                 for n in range(3000)])  # fmt: skip
    after = {"after_at": T0 + timedelta(seconds=100), "after_queue": "investment", "after_id": 700}
    for queues, account, position in itertools.product(
        ("{investment,withdrawal}", "{withdrawal}"), (None, "4000000007"), ({}, after)
    ):
        params = {"queues": queues, "account": account, "reason": None, "scan": 11, "limit": 11}
        params |= position or dict.fromkeys(after)
        nodes = explained(dbs[1], "list_parked_page", params, page_plan=True)
        index = "parked_entries_by_account" if account else "parked_entries_by_queue"
        assert indexes_read(nodes) == {index}, (queues, account, position)
        assert rows_touched(nodes) <= 22  # a page and one more per queue, never the range after the position
    # A reason no entry has: the scan bounds what a page reads, 100 per queue here.
    params = {"queues": "{investment,withdrawal}", "account": None, "reason": "needle", "scan": 100, "limit": 11}
    nodes = explained(dbs[1], "list_parked_page", {**params, **dict.fromkeys(after)}, page_plan=True)
    assert indexes_read(nodes) == {"parked_entries_by_queue"} and rows_touched(nodes) == 200


# Portfolios -------------------------------------------------------------------------------------------------------


@pytest.fixture
def priced(svc: Service, world: World) -> World:
    """Two portfolios, and tier prices changed as an operator changes them: with a history row, a tier version."""
    world.portfolio_for(ACCOUNT)
    world.portfolio_for(OTHER)
    svc.update_tiers(PRICES, "tester", "new prices")
    return world


def stepped(start: tuple[str, ...], factors: tuple[tuple[str, str], ...]) -> list[str]:
    """The oracle's amounts after one step of each tier's factor."""
    return [str(expected(amount, factor)) for amount, factor in zip(start, factors, strict=True)]


def test_a_portfolio_shows_its_amounts_and_the_records_that_made_them_labelled(svc: Service, priced: World) -> None:
    invested = priced.request("investment", ACCOUNT)
    withdrawn = priced.request("withdrawal", ACCOUNT)
    assert svc.runner.run().outcome == "ok"

    told = svc.portfolio(ACCOUNT, 10)

    now = priced.amounts(ACCOUNT)
    assert told["portfolio"] == {**{k: str(v) for k, v in now.items()}, "updated_at": told["portfolio"]["updated_at"]}
    withdrawal, investment = told["entries"]  # newest first
    values = ("tier1_value", "tier2_value", "tier3_value")
    assert (investment["queue"], investment["queue_id"], investment["portfolio_transaction"]) == (
        "investment",
        invested.queue_id,
        invested.uuid,
    )
    assert investment["before"] == dict(zip(values, ("1000.00", "2000.00", "3000.00"), strict=True))
    assert investment["after"] == dict(zip(values, stepped(("1000.00", "2000.00", "3000.00"), INVEST), strict=True))
    assert investment["factors"] == dict(zip(values, ("1.1", "0.95", "1"), strict=True))
    allocations = ("tier1_allocation", "tier2_allocation", "tier3_allocation")
    assert withdrawal["portfolio_transaction"] == withdrawn.uuid
    assert withdrawal["before"] == dict(zip(allocations, ("100.00", "200.00", "300.00"), strict=True))
    assert withdrawal["after"] == dict(zip(allocations, stepped(("100.00", "200.00", "300.00"), WITHDRAW), strict=True))
    assert withdrawal["factors"] == dict(zip(allocations, ("0.9", "1.05", "1"), strict=True))
    assert [Decimal(v) for v in investment["after"].values()] == [now[name] for name in values]

    agreement = told["agreement"]
    assert {kind: (a["agreement"], a["equal"]) for kind, a in agreement.items()} == {
        "values": ("equal", True),
        "allocations": ("equal", True),
    }
    assert agreement["values"]["record"] == investment and agreement["allocations"]["record"] == withdrawal
    assert agreement["values"]["finding"].startswith(f"the values are those after investment entry {invested.queue_id}")
    assert told["next_before"] is None


def test_a_portfolio_changed_out_of_band_no_longer_equals_the_last_after(svc: Service, priced: World) -> None:
    priced.request("investment", ACCOUNT)
    priced.request("withdrawal", ACCOUNT)
    assert svc.runner.run().outcome == "ok"
    priced.p(
        "UPDATE user_portfolios SET tier2_value = tier2_value + 5, total_value = total_value + 5 WHERE accountid = %s",
        (ACCOUNT,),
    )

    agreement = svc.portfolio(ACCOUNT, 10)["agreement"]

    values = agreement["values"]
    after = values["record"]["after"]["tier2_value"]
    now = str(Decimal(after) + 5)
    assert (values["agreement"], values["equal"]) == ("differs", False)
    assert values["differences"] == {"tier2_value": {"now": now, "after": after}}
    assert f"tier2_value is {now}, {after} after it" in values["finding"]
    assert (agreement["allocations"]["agreement"], agreement["allocations"]["differences"]) == ("equal", {})


def test_a_portfolio_the_service_never_changed_or_an_account_it_never_saw(svc: Service, priced: World) -> None:
    priced.request("investment", NO_PORTFOLIO, txn=False)  # parked: a journal record, no portfolio
    priced.request("investment", OTHER, "FAILED")  # applied, changing no amounts
    assert svc.runner.run().outcome == "ok"

    untouched = svc.portfolio(OTHER, 10)
    assert {kind: (a["agreement"], a["equal"], a["record"]) for kind, a in untouched["agreement"].items()} == {
        "values": ("no_record", None, None),
        "allocations": ("no_record", None, None),
    }
    assert [(e["kind"], e["status"], e["before"], e["factors"]) for e in untouched["entries"]] == [
        ("applied", "FAILED", None, None)
    ]
    orphan = svc.portfolio(NO_PORTFOLIO, 10)
    assert orphan["portfolio"] is None and [e["kind"] for e in orphan["entries"]] == ["parked"]
    assert {a["agreement"] for a in orphan["agreement"].values()} == {"no_portfolio"}
    assert svc.portfolio("4000000404", 10) is None


def test_a_portfolio_pages_its_records_and_compares_only_what_it_read(
    svc: Service, priced: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = priced.request("investment", ACCOUNT)
    assert svc.runner.run().outcome == "ok"
    later = [priced.request("withdrawal", ACCOUNT) for _ in range(4)]
    assert svc.runner.run().outcome == "ok"

    pages = walk(lambda limit, before: svc.portfolio(ACCOUNT, limit, before), 2)
    assert [e["queue_id"] for p in pages for e in p["entries"]] == [r.queue_id for r in [first, *later]][::-1]
    assert pages[0]["agreement"] == pages[-1]["agreement"]  # whatever the page
    assert pages[0]["agreement"]["values"]["record"]["queue_id"] == first.queue_id

    monkeypatch.setattr(portfolios, "RECORDS_READ_MAX", 4)  # the investment is the fifth newest record
    values = svc.portfolio(ACCOUNT, 2)["agreement"]["values"]
    assert (values["agreement"], values["equal"]) == ("not_in_recent_records", None)
    assert "newest 4 journal records" in values["finding"]


def test_the_portfolio_reads_go_along_their_indexes_however_stale_the_statistics(world: World, dbs) -> None:
    world.portfolio_for(ACCOUNT)
    world.p("ANALYZE consistency.journal")
    world.p("ANALYZE consistency.tier_value_history")
    world.p(
        "INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, tier1_before, tier2_before,"
        " tier3_before, tier1_after, tier2_after, tier3_after, tier_version)"
        " SELECT 'withdrawal', n, CASE WHEN n %% 3 = 0 THEN %s ELSE %s END, 'applied', 'COMPLETED', 1, 1, 1, 1, 1, 1, 1"
        " FROM generate_series(1, 3000) AS n",
        (ACCOUNT, OTHER),
    )
    world.p(
        "INSERT INTO consistency.tier_value_history (tier, new_pool, new_market)"
        " SELECT 1 + n % 3, 1000000, 1000000 + n FROM generate_series(1, 3000) AS n"
    )
    params = {"account": ACCOUNT, "scan": 50, "investment": "investment", "withdrawal": "withdrawal"}
    standing = explained(dbs[1], "portfolio_standing", params, page_plan=True)
    assert indexes_read(standing) == {"journal_account", "user_portfolios_pkey"} and rows_touched(standing) == 50
    newest = world.p("SELECT max(id) FROM consistency.journal WHERE account_number = %s", (ACCOUNT,))[0][0]
    for before, ids in [(newest - 300, None), (None, pg_array([newest - 30, newest - 3]))]:
        params = {"account": ACCOUNT, "before": before, "ids": ids, "limit": 11}
        page = explained(dbs[1], "list_account_journal", params, page_plan=True)
        assert "journal_account" in indexes_read(page) and rows_touched(page) <= 11
    versions = explained(dbs[1], "tier_values_at_versions", {"versions": pg_array([2000, 2500, 2999])}, page_plan=True)
    assert indexes_read(versions) == {"tier_value_history_tier"} and rows_touched(versions) == 9
