"""Notifications: the opt-in queue-db trigger, the listener that wakes the poller, and polling without them."""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg2
import psycopg2.extensions
import pytest

import listener
from db import Database
from devkit import ROOT, postgres
from devkit.net import wait_until
from domain import CycleResult
from listener import LISTENER_NAME, Listener
from poller import WAKE_MIN_GAP, Poller, Progress
from service import Service
from tests.world import World

ACCOUNT = "5000000001"
NOTIFY_SQL = ROOT / "schema" / "queue_notify.sql"
# libpq quotes a badly percent-encoded password back in its error message.
PASSWORD = "pw%zz-never-shown-77"


@pytest.fixture
def notifying(dbs: tuple[str, str]) -> None:
    """Install the opt-in trigger on the test's queue-db, as an operator would."""
    postgres.apply_schema(dbs[0], NOTIFY_SQL)


def idle(svc: Service) -> bool:
    """Tell whether the service's poller is between cycles."""
    return svc.poller.progress.stalled_for() == 0.0


def started(make_service: Callable[..., Service], **overrides: object) -> Service:
    """Start a service that polls only every minute, once its start-up cycles are over and it listens."""
    svc = make_service(polling_interval=60.0, **overrides)
    svc.runner.prepare()
    svc.poller.start()
    wait_until(lambda: svc.poller.last_result is not None, 10, "the start-up cycle", interval=0.02)
    if svc.poller.listener is not None:
        wait_until(svc.poller.listener.listening.is_set, 10, "the listener", interval=0.02)
    # LISTEN wakes the poller once; let that cycle pass, so that what follows is the test's own doing.
    time.sleep(WAKE_MIN_GAP * 4)
    wait_until(lambda: idle(svc), 10, "the poller to be idle", interval=0.02)
    return svc


def listener_pids(world: World) -> list[int]:
    """Return the backend pids of the listener sessions on the test's queue-db."""
    rows = world.q(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
        (LISTENER_NAME,),
    )
    return [pid for (pid,) in rows]


def applied_within(world: World, entry_uuid: str, seconds: float) -> float:
    """Wait until the entry's portfolio transaction is PROCESSED; return how long that took."""
    begun = time.monotonic()
    wait_until(lambda: world.txn_status(entry_uuid) == "PROCESSED", seconds, "the entry to be applied", 0.01)
    return time.monotonic() - begun


def received(conn: psycopg2.extensions.connection, wait: float = 0.5) -> list[str]:
    """Return the payloads of the notifications a listening connection got within `wait` seconds."""
    select.select([conn], [], [], wait)
    conn.poll()
    payloads = [n.payload for n in conn.notifies]
    conn.notifies.clear()
    return payloads


def test_the_trigger_notifies_once_per_table_and_only_when_entries_settle(notifying, dbs, world: World) -> None:
    postgres.apply_schema(dbs[0], NOTIFY_SQL)  # a second run replaces, and adds nothing
    ours = world.q("SELECT count(*) FROM pg_trigger WHERE tgname LIKE '%notify%'")[0][0]
    ear = psycopg2.connect(dbs[0])
    ear.autocommit = True
    ear.cursor().execute("LISTEN consistency_queue")
    try:
        investment = world.enqueue("investment", ACCOUNT, txn=False)
        withdrawal = world.enqueue("withdrawal", ACCOUNT, txn=False)
        world.finish(investment, "PROCESSING")
        quiet = received(ear)
        with psycopg2.connect(dbs[0]) as writer, writer.cursor() as cur:
            cur.execute("UPDATE investment_queue SET status = 'COMPLETED' WHERE queue_id = %s", (investment.queue_id,))
            cur.execute("INSERT INTO investment_queue (account_number, status) VALUES (%s, 'FAILED')", (ACCOUNT,))
            cur.execute("UPDATE withdrawal_queue SET status = 'CANCELLED' WHERE queue_id = %s", (withdrawal.queue_id,))
        settled = received(ear)
    finally:
        ear.close()
    assert ours == 4
    assert quiet == []
    assert sorted(settled) == ["investment_queue", "withdrawal_queue"]


def test_a_notified_entry_is_applied_at_once_though_the_interval_is_a_minute(
    notifying, make_service, world: World
) -> None:
    world.portfolio_for(ACCOUNT)
    svc = started(make_service)
    request = world.enqueue("investment", ACCOUNT)

    world.finish(request, "COMPLETED")

    assert applied_within(world, request.uuid, 2.0) < 2.0
    assert svc.status()["this_process"]["listening"] is True


@pytest.mark.parametrize(("trigger", "listen"), [(False, True), (True, False)], ids=["no-trigger", "listen-off"])
def test_without_notifications_a_settled_entry_waits_for_the_next_poll(
    trigger: bool, listen: bool, dbs, make_service, world: World
) -> None:
    if trigger:
        postgres.apply_schema(dbs[0], NOTIFY_SQL)
    world.portfolio_for(ACCOUNT)
    svc = started(make_service, listen_notify=listen)

    request = world.request("investment", ACCOUNT)
    time.sleep(1.5)

    assert world.txn_status(request.uuid) == "PENDING"
    assert (svc.poller.listener is not None) == listen
    assert len(listener_pids(world)) == int(listen)
    assert svc.poller.trigger().to_json()["result"] == "ok"  # what the interval would have done
    assert world.txn_status(request.uuid) == "PROCESSED"


def test_the_listener_reconnects_after_its_session_is_terminated_and_wakes_again(
    notifying, make_service, world: World, caplog, monkeypatch
) -> None:
    monkeypatch.setattr(listener, "RETRY_FIRST", 0.2)
    world.portfolio_for(ACCOUNT)
    svc = started(make_service)
    first = listener_pids(world)

    with caplog.at_level(logging.INFO, logger="listener"):
        world.q("SELECT pg_terminate_backend(%s)", (first[0],))
        wait_until(lambda: listener_pids(world) not in ([], first), 10, "a new listener session", interval=0.02)
        wait_until(svc.poller.listener.listening.is_set, 5, "the listener to listen again", interval=0.02)
        wait_until(lambda: idle(svc), 10, "the poller to be idle", interval=0.02)
        request = world.request("investment", ACCOUNT)
        applied_within(world, request.uuid, 2.0)

    assert len(first) == 1
    assert svc.poller.is_alive()
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "listener"]
    assert [level for level, _ in said] == ["WARNING", "INFO"], said
    assert "listening to queue-db notifications again" in said[1][1]


@pytest.mark.parametrize(
    "uri",
    [f"postgresql://svc:{PASSWORD}@127.0.0.1:5432/queue-db", f"postgresql://svc:{PASSWORD}@127.0.0.1:1/queue-db"],
    ids=["bad-uri", "refused"],
)
def test_a_listener_that_cannot_connect_warns_once_and_never_shows_the_password(
    uri: str, settings, caplog, monkeypatch
) -> None:
    monkeypatch.setattr(listener, "RETRY_FIRST", 0.02)
    woken = threading.Event()
    ear = Listener(Database("queue-db", uri, settings), woken.set)
    with caplog.at_level(logging.DEBUG, logger="listener"):
        ear.start()
        wait_until(lambda: len(caplog.records) >= 3, 10, "three attempts", interval=0.02)
        ear.stop()

    assert not ear.is_alive() and not woken.is_set()
    levels = [r.levelname for r in caplog.records if r.name == "listener"]
    assert levels.count("WARNING") == 1 and levels[0] == "WARNING"
    assert "polling continues" in caplog.records[0].getMessage()
    assert "never-shown" not in caplog.text


def fake_poller(cycle: Callable[[float, Progress], object]) -> Poller:
    """A poller around a stand-in cycle, polling every minute."""
    return Poller(cycle, 60.0, 1.0, threading.Event())  # type: ignore[arg-type]


def done() -> CycleResult:
    """The result a stand-in cycle returns."""
    return CycleResult(datetime.now(UTC), "ok", 0.0)


def test_wake_ups_during_a_cycle_make_exactly_one_more_cycle_right_after() -> None:
    starts: list[float] = []
    release = threading.Event()

    def cycle(lock_wait: float, progress: Progress, fresh_for: float) -> CycleResult:
        starts.append(time.monotonic())
        if len(starts) == 1:
            release.wait(5)
        return done()

    poller = fake_poller(cycle)
    poller.start()
    try:
        wait_until(lambda: starts, 5, "the start-up cycle", interval=0.01)
        for _ in range(20):
            poller.wake()
        release.set()
        time.sleep(0.5)
    finally:
        poller.stop()
    assert len(starts) == 2


def test_a_stream_of_wake_ups_is_paced_not_a_storm() -> None:
    starts: list[float] = []
    poller = fake_poller(lambda lock_wait, progress, fresh_for: starts.append(time.monotonic()) or done())
    poller.start()
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            poller.wake()
            time.sleep(0.001)
    finally:
        poller.stop()
    assert 10 <= len(starts) <= 1.0 / WAKE_MIN_GAP + 2
