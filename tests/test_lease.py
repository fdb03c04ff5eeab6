"""The cycle lease: one holder at a time, taken over when it stops renewing, its late writes refused, one cycle per
interval across every process, and liveness that tells of a frozen holder in this replica."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

import lease
from devkit.net import wait_until
from poller import Poller, Progress
from tests.test_listener import done
from tests.world import World

ACCOUNT = "1000000001"


def test_a_lease_held_elsewhere_skips_the_cycle_until_it_is_given_back(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    request = world.request("investment", ACCOUNT)
    with world.cycle_lease_held():
        assert svc.runner.run(lock_wait=0.3).outcome == "skipped"
        assert world.txn_status(request.uuid) == "PENDING"
    assert svc.runner.run().outcome == "ok"
    assert world.txn_status(request.uuid) == "PROCESSED"


def test_an_expired_lease_is_taken_over_and_the_old_holders_next_transaction_writes_nothing(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    frozen = psycopg2.connect(world.portfolio_uri)
    try:
        old, _ = lease.take(frozen, 0.2, 0.0, 0.0)
        assert old is not None
        time.sleep(0.3)  # it renews nothing: frozen
        request = world.request("investment", ACCOUNT)
        assert svc.runner.run().outcome == "ok"  # another process takes the lease over
        lost = pytest.raises(psycopg2.Error, match=f"the cycle lease of epoch {old.epoch} was lost")
        with lost, old.transaction() as cur:
            cur.execute("UPDATE user_portfolios SET tier1_value = 0 WHERE accountid = %s", (ACCOUNT,))
    finally:
        frozen.close()
    assert world.amounts(ACCOUNT)["tier1_value"] != 0
    assert world.txn_status(request.uuid) == "PROCESSED"


def test_a_holder_that_lost_the_lease_before_saving_its_summary_saves_nothing(svc, world: World, mocker) -> None:
    world.portfolio_for(ACCOUNT)
    assert svc.runner.run().outcome == "ok"
    saved = world.p("SELECT summary FROM consistency.last_cycle")
    taker = psycopg2.connect(world.portfolio_uri)
    cycle = svc.runner._cycle

    def then_frozen_and_taken_over(*args: object) -> object:
        work = cycle(*args)
        world.p("UPDATE consistency.cycle_lease SET expires_at = clock_timestamp()")  # it renewed nothing since
        assert lease.take(taker, 60.0, 0.0, 0.0)[0] is not None
        return work

    mocker.patch.object(svc.runner, "_cycle", side_effect=then_frozen_and_taken_over)
    request = world.request("investment", ACCOUNT)
    try:
        result = svc.runner.run()
    finally:
        taker.close()
    assert result.outcome == "error"
    assert "was lost" in (result.error or "")
    assert world.p("SELECT summary FROM consistency.last_cycle") == saved  # not overwritten by the late holder
    assert world.txn_status(request.uuid) == "PROCESSED"  # what it applied under the lease stays


def test_a_lease_whose_holder_session_ended_is_free_at_once(svc, world: World) -> None:
    crashed = psycopg2.connect(world.portfolio_uri)
    held, _ = lease.take(crashed, 3600.0, 0.0, 0.0)
    assert held is not None
    assert svc.runner.run().outcome == "skipped"
    crashed.close()  # as a SIGKILL of its process would: the server ends the session
    wait_until(lambda: svc.runner.run().outcome == "ok", 5, "the lease to be taken over", interval=0.05)


def test_a_holder_inside_a_transaction_keeps_its_lease_past_expiry(svc, world: World) -> None:
    slow = psycopg2.connect(world.portfolio_uri)
    try:
        held, _ = lease.take(slow, 0.2, 0.0, 0.0)
        assert held is not None
        with held.transaction():
            time.sleep(0.4)  # a long statement: the lease row stays locked by its open transaction
            assert svc.runner.run().outcome == "skipped"
        with held.transaction():  # renewed: still its lease
            pass
        lease.give(held)
    finally:
        slow.close()
    assert svc.runner.run().outcome == "ok"


def test_no_cycle_runs_when_one_started_within_the_interval_but_a_trigger_always_does(svc) -> None:
    assert svc.runner.run().outcome == "ok"
    assert svc.runner.run(fresh_for=60).outcome == "skipped"
    assert svc.runner.run(fresh_for=0).outcome == "ok"
    time.sleep(0.3)
    assert svc.runner.run(fresh_for=0.2).outcome == "ok"


def test_liveness_fails_while_a_process_of_this_replica_holds_the_lease_without_renewing_it(
    make_app, world: World
) -> None:
    app = make_app(cycle_lease=4.0, polling_interval=3600.0)
    client = app.test_client()
    poller = app.extensions["consistency"].poller
    answers = []
    with world.cycle_lease_held():
        poller.start()
        try:
            for holder, seconds in [
                (lease.this_replica() + "99999", 0),  # renewed a moment ago
                ("another-host:1:2", 3),  # another replica's: its own /health tells
                (lease.this_replica() + "99999", 3),  # a sibling worker, frozen for more than a quarter of the lease
            ]:
                world.p(
                    "UPDATE consistency.cycle_lease SET holder = %s, renewed_at = now() - make_interval(secs => %s)",
                    (holder, seconds),
                )
                assert poller.run_once().outcome == "skipped"
                answers.append(client.get("/health"))
        finally:
            poller.stop()
    assert [answer.status_code for answer in answers] == [200, 200, 503]
    assert answers[-1].get_json()["poller"] == "lease-stalled"
    assert answers[-1].get_json()["lease_holder"] == lease.this_replica() + "99999"


def test_the_poller_asks_for_a_cycle_only_if_none_started_within_the_interval_or_since_a_wake_up() -> None:
    calls: list[tuple[float, float]] = []
    woken = threading.Event()

    def cycle(lock_wait: float, progress: Progress, fresh_for: float) -> object:
        calls.append((lock_wait, fresh_for))
        woken.set()
        return done()

    poller = Poller(cycle, 60.0, 1.0, threading.Event())  # type: ignore[arg-type]
    poller.start()
    try:
        woken.wait(5)
        woken.clear()
        poller.wake()
        woken.wait(5)
        woken.clear()
        poller.trigger()
    finally:
        poller.stop()
    start, wake, trigger = calls[:3]
    assert start == (0.0, 60.0)  # another process may have run one a moment ago
    assert wake[0] == 0.0 and 0 <= wake[1] < 1.0  # any cycle that started after the wake-up serves it
    assert trigger == (1.0, 0.0)  # waits for its turn, and runs however recent the last cycle


def test_a_process_keeps_the_time_of_its_own_renewals_and_forgets_a_lease_given_back(world: World) -> None:
    conn = psycopg2.connect(world.portfolio_uri)
    try:
        held, _ = lease.take(conn, 60.0, 0.0, 0.0)
        assert held is not None
        time.sleep(0.3)
        assert 0.3 <= lease.HELD.unrenewed_for() < 1.0  # by this process's clock: no database asked
        with held.transaction():
            pass
        assert lease.HELD.unrenewed_for() < 0.1  # the fence renewed it
        lease.give(held)
        assert lease.HELD.unrenewed_for() == 0.0
        lost, _ = lease.take(conn, 60.0, 0.0, 0.0)
        assert lost is not None
    finally:
        conn.close()  # its session is gone, and the lease with it: this process holds nothing
    time.sleep(0.1)
    assert lease.HELD.unrenewed_for() == 0.0


def test_liveness_fails_by_its_own_clock_while_its_cycle_holds_the_lease_without_renewing(make_app, mocker) -> None:
    app = make_app(cycle_lease=2.0, polling_interval=3600.0)
    client = app.test_client()
    svc = app.extensions["consistency"]
    svc.runner.prepare()
    stuck, cycle = threading.Event(), svc.runner._cycle

    def held_up(*args: object) -> object:
        stuck.wait(10)  # a read that gets no answer, say: the database is not asked how the lease stands
        return cycle(*args)

    mocker.patch.object(svc.runner, "_cycle", side_effect=held_up)
    svc.poller.start()
    try:
        wait_until(lambda: client.get("/health").status_code == 503, 3, "liveness to fail", interval=0.05)
        failing = client.get("/health").get_json()
        stuck.set()
        wait_until(lambda: client.get("/health").status_code == 200, 5, "liveness to recover", interval=0.05)
    finally:
        stuck.set()
        svc.poller.stop()
    assert failing["poller"] == "lease-stalled"
    assert failing["lease_holder"] == lease.this_process()
    assert failing["seconds_without_progress"] >= 0.5  # a quarter of the lease, to a tenth


def test_the_status_names_the_lease_holder_while_its_cycle_holds_it_and_no_one_once_given_back(
    make_service, world: World, mocker
) -> None:
    holder, other = make_service(), make_service()
    holder.runner.prepare()
    holding, release, cycle = threading.Event(), threading.Event(), holder.runner._cycle

    def held_up(*args: object) -> object:
        holding.set()
        release.wait(10)
        return cycle(*args)

    mocker.patch.object(holder.runner, "_cycle", side_effect=held_up)
    running = threading.Thread(target=holder.poller.run_once)
    running.start()
    try:
        assert holding.wait(10)
        time.sleep(0.2)
        other.cache.forget()
        during = other.status()["lease"]
    finally:
        release.set()
        running.join(10)
    other.cache.forget()
    after = other.status()["lease"]

    assert during["holder"] == lease.this_process()
    assert 0.2 <= during["renewed_s_ago"] < 5 and 0 < during["expires_in_s"] <= holder.settings.cycle_lease
    assert after == {"holder": None, "epoch": during["epoch"], "renewed_s_ago": None, "expires_in_s": None}


def test_the_status_names_no_holder_once_the_holder_s_session_is_gone(svc, world: World) -> None:
    crashed = psycopg2.connect(world.portfolio_uri)
    held, _ = lease.take(crashed, 3600.0, 0.0, 0.0)
    assert held is not None
    svc.cache.forget()
    assert svc.status()["lease"]["holder"] == lease.this_process()
    crashed.close()  # as a SIGKILL of its process would: the lease is free at once

    def shown_holder() -> object:
        svc.cache.forget()
        return svc.status()["lease"]["holder"]

    wait_until(lambda: shown_holder() is None, 5, "the lease to show free", interval=0.05)
