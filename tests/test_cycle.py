"""The eight-step cycle against real databases: each step, rounding, exactly once, resume, late commits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal

import psycopg2
import psycopg2.extensions
import pytest

from db import in_transaction
from domain import CycleWork
from horizon import read_horizon
from lease import Lease
from poller import Progress
from tests.world import World, expected

ACCOUNT = "1000000001"


def counts(summary: dict, queue: str) -> dict:
    """Return one queue's counts from a cycle summary."""
    assert summary["result"] == "ok", summary
    return summary["counts"][queue]


def test_completed_investment_scales_values_by_one_plus_delta(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT, values=("1000.00", "2000.00", "3000.00"))
    world.set_tiers(TIER1_MV="1100000", TIER2_MV="1900000", TIER3_MV="500000")
    request = world.request("investment", ACCOUNT)

    summary = svc.runner.run().to_json()

    assert counts(summary, "investment")["COMPLETED"] == 1
    got = world.amounts(ACCOUNT)
    # del_t1 = 0.1, del_t2 = -0.05, del_t3 = 0.
    assert got["tier1_value"] == expected("1000.00", ("1100000", "1000000")) == Decimal("1100.00")
    assert got["tier2_value"] == expected("2000.00", ("1900000", "2000000")) == Decimal("1900.00")
    assert got["tier3_value"] == Decimal("3000.00")
    assert got["total_value"] == got["tier1_value"] + got["tier2_value"] + got["tier3_value"]
    assert (got["tier1_allocation"], got["total_allocation"]) == (Decimal("100.00"), Decimal("600.00"))
    assert world.txn_status(request.uuid) == "PROCESSED"


def test_completed_withdrawal_scales_allocations_by_one_minus_delta(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT, allocations=("100.00", "200.00", "300.00"))
    world.set_tiers(TIER1_MV="1100000", TIER2_MV="1900000")
    request = world.request("withdrawal", ACCOUNT)

    counts(svc.runner.run().to_json(), "withdrawal")

    got = world.amounts(ACCOUNT)
    assert got["tier1_allocation"] == expected("100.00", ("900000", "1000000")) == Decimal("90.00")
    assert got["tier2_allocation"] == expected("200.00", ("2100000", "2000000")) == Decimal("210.00")
    assert got["tier3_allocation"] == Decimal("300.00")
    assert got["total_allocation"] == Decimal("600.00")
    assert got["tier1_value"] == Decimal("1000.00")  # withdrawals leave values alone
    assert world.txn_status(request.uuid) == "PROCESSED"


@pytest.mark.parametrize("status", ["FAILED", "CANCELLED"])
def test_failed_and_cancelled_entries_mirror_their_status_and_move_no_money(svc, world: World, status) -> None:
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1500000")
    before = world.amounts(ACCOUNT)
    invest = world.request("investment", ACCOUNT, status)
    withdraw = world.request("withdrawal", ACCOUNT, status)

    summary = svc.runner.run().to_json()

    assert counts(summary, "investment")[status] == 1
    assert world.amounts(ACCOUNT) == before
    assert world.txn_status(invest.uuid) == status
    assert world.txn_status(withdraw.uuid) == status


@pytest.mark.parametrize("status", ["PENDING", "PROCESSING"])
def test_entries_not_yet_final_change_nothing(svc, world: World, status) -> None:
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1500000")
    before = world.amounts(ACCOUNT)
    request = world.request("investment", ACCOUNT, status)

    svc.runner.run()

    assert world.amounts(ACCOUNT) == before
    assert world.txn_status(request.uuid) == "PENDING"
    assert world.applied() == 0
    # Once it completes, it is applied.
    world.finish(request)
    svc.runner.run()
    assert world.txn_status(request.uuid) == "PROCESSED"
    assert world.amounts(ACCOUNT)["tier1_value"] == Decimal("1500.00")


def test_two_completed_investments_compound_with_rounding_after_each(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT, values=("0.15", "333.33", "10.01"))
    world.set_tiers(TIER1_MV="1050000", TIER2_MV="2000001", TIER3_MV="750000")
    world.request("investment", ACCOUNT)
    world.request("investment", ACCOUNT)

    svc.runner.run()

    got = world.amounts(ACCOUNT)
    assert got["tier1_value"] == expected("0.15", ("1050000", "1000000"), ("1050000", "1000000"))
    assert got["tier2_value"] == expected("333.33", ("2000001", "2000000"), ("2000001", "2000000"))
    assert got["tier3_value"] == expected("10.01", ("750000", "500000"), ("750000", "500000"))
    assert got["total_value"] == got["tier1_value"] + got["tier2_value"] + got["tier3_value"]
    # Rounding each step differs from rounding once: 0.15 -> 0.1575 -> 0.16 -> 0.168 -> 0.17 (not 0.1654 -> 0.17
    # here, but tier 3 shows it): 10.01 -> 15.015 -> 15.02 -> 22.53, while 10.01 * 2.25 = 22.5225 -> 22.52.
    assert got["tier3_value"] == Decimal("22.53")


@pytest.mark.parametrize(
    ("amount", "market", "want"),
    [
        ("0.01", "1500000", "0.02"),  # 0.015 rounds half away from zero
        ("0.03", "1500000", "0.05"),  # 0.045
        ("0.01", "1499999", "0.01"),  # 0.0149999...
        ("12345.67", "1000001", "12345.68"),  # 12345.68234567
        ("0.05", "1100000", "0.06"),  # 0.055
    ],
)
def test_each_product_is_exact_then_rounded_half_away_from_zero(svc, world: World, amount, market, want) -> None:
    world.portfolio_for(ACCOUNT, values=(amount, "0.00", "0.00"))
    world.set_tiers(TIER1_MV=market)
    world.request("investment", ACCOUNT)

    svc.runner.run()

    got = world.amounts(ACCOUNT)["tier1_value"]
    assert got == expected(amount, (market, "1000000")) == Decimal(want)


def test_a_backlog_larger_than_a_batch_matches_one_at_a_time(make_service, world: World) -> None:
    svc = make_service(batch_size=4)
    svc.runner.prepare()
    accounts = [f"10000000{n:02d}" for n in range(3)]
    for account in accounts:
        world.portfolio_for(account, values=("1000.01", "999.99", "0.07"))
    world.set_tiers(TIER1_MV="1012345", TIER2_MV="1999999", TIER3_MV="512345")
    for n in range(17):
        world.request("investment", accounts[n % 3])

    summary = svc.runner.run().to_json()

    assert counts(summary, "investment") == {
        "read": 17,
        "COMPLETED": 17,
        "FAILED": 0,
        "CANCELLED": 0,
        "parked": 0,
        "corrected": 0,
        "reused": 0,
        "reconciled": 0,
        "swept": 0,
    }
    factors = {1: ("1012345", "1000000"), 2: ("1999999", "2000000"), 3: ("512345", "500000")}
    for n, account in enumerate(accounts):
        times = len(range(n, 17, 3))
        got = world.amounts(account)
        for tier, start in zip((1, 2, 3), ("1000.01", "999.99", "0.07"), strict=True):
            assert got[f"tier{tier}_value"] == expected(start, *[factors[tier]] * times)


def test_rereading_everything_applies_nothing_twice(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1100000")
    for _ in range(5):
        world.request("investment", ACCOUNT)
    svc.runner.run()
    after_first = world.amounts(ACCOUNT)
    # Forget how far the queues were read: the next cycle re-reads every entry.
    world.p("UPDATE consistency.watermarks SET updated_at = '1970-01-01Z', queue_id = 0")

    summary = svc.runner.run().to_json()

    assert counts(summary, "investment")["read"] == 5
    assert counts(summary, "investment")["COMPLETED"] == 0
    assert world.amounts(ACCOUNT) == after_first
    assert world.applied() == 5


Cursor = psycopg2.extensions.cursor


class Unfenced(Lease):
    """A lease that every process holds at once: its transactions pass no fence."""

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """A plain transaction."""
        with in_transaction(self.conn) as cur:
            yield cur


def test_two_appliers_at_once_apply_each_entry_once_even_without_the_lock(make_service, world: World) -> None:
    runners = []
    for _ in range(2):
        service = make_service(batch_size=3)
        service.runner.prepare()
        runners.append(service.runner)
    accounts = [f"20000000{n:02d}" for n in range(4)]
    for account in accounts:
        world.portfolio_for(account)
    world.set_tiers(TIER1_MV="1100000")
    for n in range(40):
        world.request("investment", accounts[n % 4])
    start = threading.Barrier(2)
    results: list[CycleWork] = []

    def race(runner) -> None:
        # Bypass the cycle lease on purpose: correctness must not depend on it.
        with runner.portfolio_db.connection() as pconn, runner.queue_db.connection(autocommit=True) as qconn:
            start.wait()
            results.append(runner._cycle(Unfenced(pconn, 0, 0.0), qconn, Progress()))

    threads = [threading.Thread(target=race, args=(r,)) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    applied = sum(r.counts["investment"]["COMPLETED"] for r in results)
    assert applied == 40
    assert world.applied() == 40
    for account in accounts:
        assert world.amounts(account)["tier1_value"] == expected("1000.00", *[("1100000", "1000000")] * 10)


def test_a_restart_resumes_from_the_stored_watermark(make_service, world: World) -> None:
    first = make_service()
    first.runner.prepare()
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1100000")
    world.request("investment", ACCOUNT)
    first.runner.run()
    first.close()
    stored = world.p("SELECT updated_at, queue_id FROM consistency.watermarks WHERE queue = 'investment'")[0]
    assert stored[0] > datetime(1970, 1, 2, tzinfo=UTC)
    # Completed while the service was down.
    world.request("investment", ACCOUNT)
    world.request("investment", ACCOUNT)

    second = make_service()
    summary = second.runner.run().to_json()

    assert counts(summary, "investment")["COMPLETED"] == 2
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", *[("1100000", "1000000")] * 3)
    assert world.applied() == 3


def test_the_watermark_never_passes_an_open_writer_transaction(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1100000")
    late = world.enqueue("investment", ACCOUNT)
    writer = world.finish_uncommitted(late)
    try:
        # Later entries commit and are applied promptly, over several cycles.
        prompt = []
        for _ in range(3):
            prompt.append(world.request("investment", ACCOUNT))
            summary = svc.runner.run().to_json()
            assert summary["mode"] == "exact"
            assert counts(summary, "investment")["COMPLETED"] == 1
            watermark = world.p("SELECT updated_at FROM consistency.watermarks WHERE queue = 'investment'")[0][0]
            assert watermark < writer.updated_at
        assert all(world.txn_status(r.uuid) == "PROCESSED" for r in prompt)
        assert world.txn_status(late.uuid) == "PENDING"
    finally:
        writer.commit()

    summary = svc.runner.run().to_json()

    assert counts(summary, "investment")["COMPLETED"] == 1
    assert world.txn_status(late.uuid) == "PROCESSED"
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", *[("1100000", "1000000")] * 4)


def test_a_rolled_back_completion_is_never_applied(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    request = world.enqueue("investment", ACCOUNT)
    writer = world.finish_uncommitted(request)
    svc.runner.run()
    writer.rollback()

    svc.runner.run()

    assert world.txn_status(request.uuid) == "PENDING"
    assert world.applied() == 0


def test_horizon_is_the_oldest_open_transaction_less_a_margin(svc, dbs) -> None:
    writer = psycopg2.connect(dbs[0])
    with writer.cursor() as cur:
        cur.execute("SELECT now()")
        started = cur.fetchone()[0]
    try:
        with svc.queue_db.connection(autocommit=True) as conn:
            horizon = read_horizon(conn, 300)
    finally:
        writer.rollback()
        writer.close()
    assert horizon.mode == "exact"
    assert horizon.bound < started
    assert (started - horizon.bound).total_seconds() == pytest.approx(1.0, abs=0.01)


def test_an_old_open_queue_transaction_is_reported_each_cycle_and_warned_about_once(svc, dbs, caplog, mocker) -> None:
    import logging

    import horizon

    caplog.set_level(logging.INFO, logger="horizon")
    mocker.patch.object(horizon, "HELD_WARNING_SECONDS", -1.0)  # any open transaction counts as old here
    before = svc.runner.run().to_json()
    writer = psycopg2.connect(dbs[0])
    with writer.cursor() as cur:
        cur.execute("SELECT 1")  # from here on, idle in transaction
    try:
        held = [svc.runner.run().to_json(), svc.runner.run().to_json()]
    finally:
        writer.rollback()
        writer.close()
    after = svc.runner.run().to_json()

    assert before["oldest_transaction_s"] is None
    assert all(summary["oldest_transaction_s"] >= 0 for summary in held)
    assert after["oldest_transaction_s"] is None
    messages = [r.getMessage() for r in caplog.records if r.name == "horizon"]
    warned = [m for m in messages if m.startswith("a queue-db transaction has been open for")]
    assert len(warned) == 1
    assert messages.count("no queue-db transaction holds the watermarks back any longer") == 1


def test_the_backlog_is_read_in_bounded_batches(make_service, world: World, mocker) -> None:
    import queue_pass

    svc = make_service(batch_size=5)
    svc.runner.prepare()
    world.portfolio_for(ACCOUNT)
    for _ in range(23):
        world.request("withdrawal", ACCOUNT, "CANCELLED")
    reads = mocker.spy(queue_pass, "copy_batch")

    summary = svc.runner.run().to_json()

    calls = zip(reads.call_args_list, reads.spy_return_list, strict=True)
    batch_reads = [(call.args[3], data.count(b"\n")) for call, data in calls if call.args[1].name == "withdrawal"]
    assert counts(summary, "withdrawal")["CANCELLED"] == 23
    assert {limit for limit, _ in batch_reads} == {5}
    assert sum(n for _, n in batch_reads) == 23  # the investment queue is empty
    assert max(n for _, n in batch_reads) == 5


def test_the_watermark_mode_is_logged_loudly_once(svc, world: World, caplog) -> None:
    import logging

    caplog.set_level(logging.WARNING)
    svc.runner.run()
    svc.runner.run()
    announced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("watermark mode:")]
    assert announced == ["watermark mode: exact (bounded by the oldest open queue-db transaction)"]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.getMessage() in announced)
