"""Adopting the service on a running system: INITIAL_WATERMARK over a queue's history, late commits around the
baseline, the reconciliation sweep, and the audited baseline action with its dry run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import urlsplit

import psycopg2
import pytest

import adoption
import migrations
import tiers
from config import Settings
from db import DatabaseError
from devkit import ROOT, postgres, roles
from service import build_service, service_of
from tests.cluster import Cluster
from tests.tokens import OPERATOR, READER, bearer
from tests.world import TABLES, TYPES, World, expected

ACCOUNTS = [f"20000000{n:02d}" for n in range(1, 21)]
STATUSES = ("COMPLETED", "COMPLETED", "FAILED", "CANCELLED")
INVEST = ("1100000", "1000000")  # TIER1_MV / TIER1: each completed investment multiplies tier 1 by 1.1
WITHDRAW = ("900000", "1000000")  # (2 TIER1 - TIER1_MV) / TIER1 for a withdrawal


def settled_history(world: World, queue: str, count: int, start: datetime, tag: str = "h") -> None:
    """Queue `count` entries already settled long ago, one second apart from `start`, with PENDING transactions:
    the history that whatever ran before this service applied."""
    params = {"tag": f"{tag}-{queue}-", "accounts": ACCOUNTS, "k": len(ACCOUNTS), "count": count, "start": start}
    world.p(
        "INSERT INTO portfolio_transactions (id, accountid, transaction_type, total_amount)"
        " SELECT md5(%(tag)s || n)::uuid, (%(accounts)s::text[])[1 + n %% %(k)s], %(type)s, 100"
        " FROM generate_series(1, %(count)s) AS n",
        {**params, "type": TYPES[queue]},
    )
    world.q(
        f"INSERT INTO {TABLES[queue]} (account_number, uuid, status, processed_at, updated_at)"
        " SELECT (%(accounts)s::text[])[1 + n %% %(k)s], md5(%(tag)s || n)::uuid::text,"
        " (%(statuses)s::text[])[1 + n %% 4], %(start)s + n * interval '1 second', %(start)s + n * interval '1 second'"
        " FROM generate_series(1, %(count)s) AS n",
        {**params, "statuses": list(STATUSES)},
    )


def open_accounts(world: World, tiers_stored: bool = True) -> None:
    """Open every account's portfolio and make each completed entry visible in tier 1."""
    for account in ACCOUNTS:
        world.portfolio_for(account)
    if tiers_stored:
        world.set_tiers(TIER1_MV=INVEST[0])


def portfolios(world: World) -> list[tuple]:
    """Every portfolio's amounts, in account order."""
    return world.p("SELECT * FROM user_portfolios ORDER BY accountid")


def txn_statuses(world: World) -> dict[str, int]:
    """How many portfolio transactions have each status."""
    return dict(world.p("SELECT status, count(*) FROM portfolio_transactions GROUP BY status"))


def baselines(world: World) -> dict[str, tuple]:
    """The stored baseline per queue: (updated_at, queue_id, source, set_by, set_at)."""
    return {row[0]: row[1:] for row in world.p("SELECT * FROM consistency.baseline")}


def watermark(world: World, queue: str) -> tuple[datetime, int]:
    """A queue's stored watermark."""
    return world.p("SELECT updated_at, queue_id FROM consistency.watermarks WHERE queue = %s", (queue,))[0]


def queue_now(world: World) -> datetime:
    """queue-db's clock."""
    return world.q("SELECT clock_timestamp()")[0][0]


def utc(value: datetime) -> str:
    """A time as the service writes it: ISO 8601 in UTC."""
    return value.astimezone(UTC).isoformat()


def ok(summary: dict) -> dict:
    """Return a cycle's counts per queue, after checking that it ran."""
    assert summary["result"] == "ok", summary
    return summary["counts"]


def test_initial_watermark_now_applies_none_of_10000_settled_entries_and_what_settles_after_once(
    make_service, world: World, caplog
) -> None:
    open_accounts(world)
    long_ago = datetime.now(UTC) - timedelta(days=2)
    settled_history(world, "investment", 10_000, long_ago)
    settled_history(world, "withdrawal", 2_000, long_ago)
    before_money, before_txns = portfolios(world), txn_statuses(world)
    started = queue_now(world)
    svc = make_service(initial_watermark="now", batch_size=500)

    with caplog.at_level(logging.WARNING, logger="adoption"):
        first = ok(svc.runner.run().to_json())

    assert first["investment"]["read"] == first["withdrawal"]["read"] == 0
    assert world.applied() == 0
    assert world.p("SELECT count(*) FROM consistency.journal")[0][0] == 0
    assert portfolios(world) == before_money
    assert txn_statuses(world) == before_txns == {"PENDING": 12_000}
    stored = baselines(world)
    assert set(stored) == {"investment", "withdrawal"}
    for queue, (ts, queue_id, source, set_by, _) in stored.items():
        assert started < ts < queue_now(world) and (queue_id, source, set_by) == (0, "INITIAL_WATERMARK", None)
        assert long_ago + timedelta(hours=3) < watermark(world, queue)[0] <= ts
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(m.startswith("INITIAL_WATERMARK: the ") for m in warned) == 2
    shown_at = utc(stored["investment"][0])
    assert sum(m.startswith("adoption baseline in force") and shown_at in m for m in warned) == 2
    shown = svc.status()["baseline"]
    assert shown["investment"]["updated_at"] == shown_at
    assert shown["investment"]["source"] == "INITIAL_WATERMARK"

    after = [world.request("investment", ACCOUNTS[0]), world.request("investment", ACCOUNTS[0])]
    after.append(world.request("withdrawal", ACCOUNTS[1]))
    second = ok(svc.runner.run().to_json())
    third = ok(svc.runner.run().to_json())

    assert (second["investment"]["COMPLETED"], second["withdrawal"]["COMPLETED"]) == (2, 1)
    assert third["investment"]["COMPLETED"] == third["withdrawal"]["COMPLETED"] == 0
    assert world.applied() == 3
    assert all(world.txn_status(r.uuid) == "PROCESSED" for r in after)
    assert txn_statuses(world)["PENDING"] == 12_000
    assert world.amounts(ACCOUNTS[0])["tier1_value"] == expected("1000.00", INVEST, INVEST)
    assert world.amounts(ACCOUNTS[1])["tier1_allocation"] == expected("100.00", WITHDRAW)
    untouched = [row for row in portfolios(world) if row[0] not in ACCOUNTS[:2]]
    assert untouched == [row for row in before_money if row[0] not in ACCOUNTS[:2]]


def test_a_late_commit_that_settles_before_the_baseline_is_applied_once(make_service, world: World) -> None:
    open_accounts(world)
    settled_history(world, "investment", 50, datetime.now(UTC) - timedelta(days=1))
    late = world.enqueue("investment", ACCOUNTS[0])
    writer = world.finish_uncommitted(late)
    try:
        svc = make_service(initial_watermark="now")
        summary = svc.runner.run().to_json()
        ok(summary)
        assert summary["mode"] == "exact"
        baseline = baselines(world)["investment"][:2]
        assert (writer.updated_at, late.queue_id) < baseline  # the late entry settled before the baseline
        assert watermark(world, "investment") < (writer.updated_at, late.queue_id)  # the exact rule holds it
        prompt = world.request("investment", ACCOUNTS[1])
        assert ok(svc.runner.run().to_json())["investment"]["COMPLETED"] == 1
        assert world.txn_status(prompt.uuid) == "PROCESSED" and world.txn_status(late.uuid) == "PENDING"
    finally:
        writer.commit()

    applied = ok(svc.runner.run().to_json())
    again = ok(svc.runner.run().to_json())

    assert applied["investment"]["COMPLETED"] == 1 and again["investment"]["COMPLETED"] == 0
    assert world.txn_status(late.uuid) == "PROCESSED"
    assert world.amounts(ACCOUNTS[0])["tier1_value"] == expected("1000.00", INVEST)
    assert world.applied() == 2  # the late entry and the prompt one; none of the history


def test_entries_committed_between_the_horizon_and_the_baseline_are_recorded_as_adopted_not_applied(
    make_service, world: World
) -> None:
    open_accounts(world)
    # A session idle in its transaction holds the exact horizon before the entries settled just now.
    holder = psycopg2.connect(world.queue_uri)
    with holder.cursor() as cur:
        cur.execute("SELECT 1")
    time.sleep(0.05)
    recent = [world.request("investment", account) for account in ACCOUNTS[:3]]
    before_money = portfolios(world)
    try:
        svc = make_service(initial_watermark="now")
        ok(svc.runner.run().to_json())
    finally:
        holder.close()

    adopted = world.p("SELECT queue_id, kind, status, actor, reason FROM consistency.journal ORDER BY queue_id")
    assert [row[:4] for row in adopted] == [(r.queue_id, "adopted", "COMPLETED", None) for r in recent]
    assert adopted[0][4].startswith("settled before INITIAL_WATERMARK")
    assert world.applied() == 3
    later = ok(svc.runner.run().to_json())
    assert later["investment"]["read"] == 3 and later["investment"]["COMPLETED"] == 0  # read again, not applied
    assert portfolios(world) == before_money
    assert all(world.txn_status(r.uuid) == "PENDING" for r in recent)
    assert world.p("SELECT count(*) FROM consistency.corrections")[0][0] == 0


def test_a_restart_does_not_move_the_baseline(make_service, world: World, caplog) -> None:
    open_accounts(world)
    settled_history(world, "investment", 20, datetime.now(UTC) - timedelta(days=1))
    first = make_service(initial_watermark="now")
    ok(first.runner.run().to_json())
    stored = baselines(world)
    settled = world.request("investment", ACCOUNTS[0])
    ok(first.runner.run().to_json())
    moved = watermark(world, "investment")
    first.close()
    time.sleep(0.05)

    second = make_service(initial_watermark="now")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adoption"):
        summary = ok(second.runner.run().to_json())

    assert baselines(world) == stored
    assert watermark(world, "investment") >= moved
    assert summary["investment"]["COMPLETED"] == 0 and world.applied() == 1
    assert world.txn_status(settled.uuid) == "PROCESSED"
    warned = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("INITIAL_WATERMARK: the ") for m in warned)
    assert any(utc(stored["investment"][0]) in m for m in warned if m.startswith("adoption baseline in force"))


def test_an_iso_time_baseline_leaves_what_settled_before_it_and_applies_what_settled_from_it(
    make_service, world: World
) -> None:
    open_accounts(world)
    at = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    settled_history(world, "investment", 30, at - timedelta(seconds=31), tag="before")  # the last one: at - 1 s
    settled_history(world, "investment", 8, at - timedelta(seconds=1), tag="from")  # the first one exactly at `at`
    east = timezone(timedelta(hours=5, minutes=30))
    svc = make_service(initial_watermark=at.astimezone(east))

    summary = ok(svc.runner.run().to_json())

    stored = baselines(world)["investment"]
    assert stored[:3] == (at, 0, "INITIAL_WATERMARK")
    applied = dict(world.p("SELECT status, count(*) FROM consistency.applied_entries GROUP BY status"))
    from_at = [STATUSES[n % 4] for n in range(1, 9)]
    assert applied == {s: from_at.count(s) for s in set(from_at)}
    assert summary["investment"]["read"] == 8
    first_from = world.q("SELECT queue_id FROM investment_queue WHERE updated_at = %s", (at,))[0][0]
    assert world.p("SELECT count(*) FROM consistency.applied_entries WHERE queue_id = %s", (first_from,))[0][0] == 1
    assert world.p("SELECT min(queue_id) FROM consistency.applied_entries")[0][0] == first_from


def test_a_time_later_than_queue_db_s_clock_is_taken_as_now(make_service, world: World) -> None:
    svc = make_service(initial_watermark=datetime.now(UTC) + timedelta(days=30))
    ok(svc.runner.run().to_json())
    settled = world.request("investment", "2000000099", txn=False)  # no portfolio: parked once read

    ok(svc.runner.run().to_json())

    assert baselines(world)["investment"][0] < queue_now(world)
    assert list(world.parked()) == [settled.uuid]


def test_processes_that_start_together_set_the_baseline_once(make_service, world: World, caplog) -> None:
    open_accounts(world)
    settled_history(world, "investment", 20, datetime.now(UTC) - timedelta(days=1))
    services = [make_service(initial_watermark="now") for _ in range(4)]
    errors: list[BaseException] = []

    def start(svc) -> None:
        try:
            svc.runner.prepare()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=start, args=(svc,)) for svc in services]
    with caplog.at_level(logging.WARNING, logger="adoption"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

    assert errors == []
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("INITIAL_WATERMARK: the ")]
    assert sorted(m.split()[2] for m in started) == ["investment", "withdrawal"]
    assert world.p("SELECT count(*) FROM consistency.baseline")[0][0] == 2
    in_force = [r for r in caplog.records if r.getMessage().startswith("adoption baseline in force")]
    assert len(in_force) == 2 * len(services)


@pytest.fixture(scope="module")
def two_phase_server() -> Iterator[Cluster]:
    """A server of this module's own with two-phase commit enabled."""
    cluster = Cluster(max_prepared_transactions="2")
    yield cluster
    cluster.destroy()


def test_initial_watermark_waits_while_a_prepared_transaction_hides_its_start(two_phase_server: Cluster) -> None:
    names = [postgres.unique_name("cm_2pc_queue"), postgres.unique_name("cm_2pc_portfolio")]
    for name in names:
        postgres.admin(two_phase_server.uri, f'CREATE DATABASE "{name}"')
    queue_uri, portfolio_uri = (postgres.with_database(two_phase_server.uri, name) for name in names)
    postgres.apply_schema(queue_uri, ROOT / "schema" / "queue_db.sql")
    seed = Settings().tier_seed
    postgres.apply_schema(
        portfolio_uri,
        ROOT / "schema" / "user_portfolio_db.sql",
        lambda cur: (migrations.migrate(cur), tiers.seed(cur, seed)),
    )
    world = World(queue_uri, portfolio_uri)
    svc = build_service(Settings(queue_db_uri=queue_uri, portfolio_db_uri=portfolio_uri, initial_watermark="now"))
    prepared = psycopg2.connect(queue_uri)
    try:
        open_accounts(world)
        settled_history(world, "investment", 5, datetime.now(UTC) - timedelta(days=1))
        prepared.tpc_begin(prepared.xid(1, "adoption-test", "q"))
        with prepared.cursor() as cur:
            cur.execute("SELECT 1")
        prepared.tpc_prepare()

        waiting = svc.runner.run().to_json()

        assert waiting["result"] == "error" and "prepared transaction" in waiting["error"]
        assert baselines(world) == {} and watermark(world, "investment")[0] == datetime(1970, 1, 1, tzinfo=UTC)
        prepared.tpc_rollback()
        assert svc.runner.run().to_json()["result"] == "ok"
        assert set(baselines(world)) == {"investment", "withdrawal"} and world.applied() == 0
    finally:
        prepared.close()
        svc.close()
        world.close()
        for name in names:
            postgres.drop(two_phase_server.uri, name)


@pytest.fixture
def limited(pg, dbs, settings, lookback_role, world: World) -> Iterator:
    """A factory of services running as the limited role (look-back mode: a 3 s window, a sweep every 3 s)."""
    names = [urlsplit(uri).path.lstrip("/") for uri in dbs]
    world.p("DROP SCHEMA consistency CASCADE")
    roles.apply_grants(pg, lookback_role, *names)
    limited_settings = replace(
        settings,
        queue_db_uri=roles.with_user(dbs[0], lookback_role),
        portfolio_db_uri=roles.with_user(dbs[1], lookback_role),
        lookback_window=3.0,
        reconcile_interval=3.0,
        batch_size=200,
    )
    made = []

    def make(**overrides: object):
        made.append(build_service(replace(limited_settings, **overrides)))
        made[-1].runner.prepare()
        return made[-1]

    yield make
    for svc in made:
        svc.close()


def test_the_reconciliation_sweep_applies_nothing_before_the_baseline(limited, world: World) -> None:
    open_accounts(world, tiers_stored=False)  # the limited role creates the state schema as it starts
    settled_history(world, "investment", 1_000, datetime.now(UTC) - timedelta(days=1))
    settled_history(world, "withdrawal", 500, datetime.now(UTC) - timedelta(days=1))
    svc = limited(initial_watermark="now")
    world.set_tiers(TIER1_MV=INVEST[0])
    before_money = portfolios(world)

    swept = svc.runner.run().to_json()

    assert swept["mode"] == "lookback" and swept["reconciled"] is True
    assert ok(swept)["investment"]["reconciled"] == ok(swept)["withdrawal"]["reconciled"] == 0
    assert world.applied() == 0 and portfolios(world) == before_money

    # After the baseline the sweep still finds a commit later than the drain's reading, once.
    late = world.enqueue("investment", ACCOUNTS[0])
    writer = world.finish_uncommitted(late)
    try:
        time.sleep(1.3)  # the writer holds its transaction past the drain's reading, within the 3 s window
        world.request("investment", ACCOUNTS[1])
        assert ok(svc.runner.run().to_json())["investment"]["COMPLETED"] == 1
        assert watermark(world, "investment")[0] < writer.updated_at  # only the sweep moves it
    finally:
        writer.commit()
    assert ok(svc.runner.run().to_json())["investment"]["read"] == 0  # the drain does not see it
    time.sleep(3.1)  # RECONCILE_INTERVAL since the first sweep
    found = svc.runner.run().to_json()

    assert found["reconciled"] is True and ok(found)["investment"]["reconciled"] == 1
    assert world.txn_status(late.uuid) == "PROCESSED"
    assert world.applied() == 2
    assert txn_statuses(world)["PENDING"] == 1_500
    assert world.amounts(ACCOUNTS[0])["tier1_value"] == expected("1000.00", INVEST)


URL = "/api/v1/consistency/baseline"


def audit_rows(world: World) -> list[tuple]:
    """The audit trail, oldest first: actor, action, target, reason, detail."""
    return world.p("SELECT actor, action, target, reason, detail FROM consistency.audit_log ORDER BY id")


def kept_state(world: World) -> tuple:
    """Everything the baseline action may change, and the money it must not."""
    counts = world.p(
        "SELECT (SELECT count(*) FROM consistency.applied_entries), (SELECT count(*) FROM consistency.journal),"
        " (SELECT count(*) FROM consistency.audit_log), (SELECT count(*) FROM consistency.parked_entries)"
    )[0]
    return counts, baselines(world), portfolios(world), txn_statuses(world)


def history_ids(world: World, queue: str, before: datetime) -> set[int]:
    """The queue_ids of a queue's settled entries updated before a time."""
    settled = "status IN ('COMPLETED', 'FAILED', 'CANCELLED')"
    rows = world.q(f"SELECT queue_id FROM {TABLES[queue]} WHERE updated_at < %s AND {settled}", (before,))
    return {row[0] for row in rows}


def test_the_baseline_action_counts_in_a_dry_run_then_records_exactly_those_moving_no_money(
    make_app, world: World
) -> None:
    open_accounts(world)
    long_ago = datetime.now(UTC) - timedelta(days=2)
    settled_history(world, "investment", 600, long_ago)
    settled_history(world, "withdrawal", 400, long_ago)
    app = make_app(api_tokens=(OPERATOR, READER), initial_watermark="now", batch_size=100)
    svc = service_of(app)
    ok(svc.runner.run().to_json())  # adopted at start-up: the history has no ledger record
    applied = [world.request("investment", ACCOUNTS[0]) for _ in range(3)]
    parked = world.request("withdrawal", ACCOUNTS[2], txn=False)
    dismissed = world.request("investment", ACCOUNTS[3], txn=False)
    assert ok(svc.runner.run().to_json())["investment"]["COMPLETED"] == 3 and len(world.parked()) == 2
    # An operator resolved one of the two parked entries, as the resolve action stores it.
    world.p(
        "DELETE FROM consistency.parked_entries WHERE queue = 'investment' AND queue_id = %s", (dismissed.queue_id,)
    )
    world.p(
        "INSERT INTO consistency.resolved_entries (queue, queue_id, uuid, reason, resolved_by)"
        " VALUES ('investment', %s, %s, 'never to apply', 'bob')",
        (dismissed.queue_id, dismissed.uuid),
    )
    cutoff = queue_now(world)
    later = world.request("investment", ACCOUNTS[4])  # settled after the cutoff: not the action's
    body = {
        "before": cutoff.astimezone(timezone(timedelta(hours=-5))).isoformat(),
        "reason": "cut over from the old applier",
    }
    client = app.test_client()
    untouched = kept_state(world)

    dry = client.post(URL, json={**body, "dry_run": True}, headers=bearer(OPERATOR))

    assert dry.status_code == 200, dry.get_json()
    history = {queue: history_ids(world, queue, cutoff) for queue in TABLES}
    history["investment"] -= {r.queue_id for r in applied} | {dismissed.queue_id}
    history["withdrawal"] -= {parked.queue_id}
    assert (
        dry.get_json()["entries"]
        == {"investment": 600, "withdrawal": 400}
        == {q: len(ids) for q, ids in history.items()}
    )
    assert dry.get_json()["dry_run"] is True and dry.get_json()["audit_id"] is None
    assert kept_state(world) == untouched

    real = client.post(URL, json={**body, "dry_run": False}, headers=bearer(OPERATOR))

    assert real.status_code == 200, real.get_json()
    answer = real.get_json()
    assert answer["entries"] == dry.get_json()["entries"]
    adopted = world.p("SELECT queue, queue_id, actor, reason FROM consistency.journal WHERE kind = 'adopted'")
    assert {(q, i) for q, i, *_ in adopted} == {(q, i) for q, ids in history.items() for i in ids}
    assert len(adopted) == 1000 and {(a, r) for *_, a, r in adopted} == {("alice", body["reason"])}
    ledger = world.p("SELECT queue, queue_id FROM consistency.applied_entries")
    assert set(ledger) == {(q, i) for q, i, *_ in adopted} | {("investment", r.queue_id) for r in applied}
    recorded = world.p("SELECT a.status, count(*) FROM consistency.applied_entries a JOIN consistency.journal j"
                       " USING (queue, queue_id) WHERE j.kind = 'adopted' GROUP BY a.status")  # fmt: skip
    assert dict(recorded) == {"COMPLETED": 500, "FAILED": 250, "CANCELLED": 250}
    assert (portfolios(world), txn_statuses(world)) == untouched[2:]  # no money moved, no transaction touched
    trail = audit_rows(world)
    assert len(trail) == 1 and answer["audit_id"] is not None
    actor, action, target, reason, detail = trail[0]
    assert (actor, action, reason) == ("alice", "baseline", body["reason"])
    assert datetime.fromisoformat(target["before"]) == cutoff and detail["recorded"] == answer["entries"]
    stored = baselines(world)
    assert {q: b[:4] for q, b in stored.items()} == {q: (cutoff, 0, "baseline action", "alice") for q in TABLES}
    assert answer["baseline"]["withdrawal"]["set_by"] == "alice"
    assert list(world.parked()) == [parked.uuid]

    # A later cycle applies none of them; a history entry the queue changes afterwards is a correction.
    completed = world.q("SELECT queue_id FROM investment_queue WHERE status = 'COMPLETED' ORDER BY queue_id")
    corrected = min(i for (i,) in completed if i in history["investment"])
    world.q("UPDATE investment_queue SET status = 'FAILED' WHERE queue_id = %s", (corrected,))
    summary = ok(svc.runner.run().to_json())

    assert (summary["investment"]["COMPLETED"], summary["investment"]["corrected"]) == (1, 1)
    assert world.txn_status(later.uuid) == "PROCESSED"
    moved = [row for row in portfolios(world) if row not in untouched[2]]
    assert [row[0] for row in moved] == [ACCOUNTS[4]]
    again = client.post(URL, json={**body, "dry_run": False}, headers=bearer(OPERATOR))
    assert again.get_json()["entries"] == {"investment": 0, "withdrawal": 0}


def test_an_interrupted_baseline_action_is_finished_by_running_it_again(make_app, world: World, mocker) -> None:
    open_accounts(world)
    settled_history(world, "investment", 500, datetime.now(UTC) - timedelta(days=1))
    settled_history(world, "withdrawal", 300, datetime.now(UTC) - timedelta(days=1))
    app = make_app(api_tokens=(OPERATOR,), initial_watermark="now", batch_size=100)
    service_of(app).runner.prepare()
    client = app.test_client()
    body = {"before": queue_now(world).isoformat(), "reason": "adopt the history", "dry_run": False}
    real, chunks = adoption.adopt, []

    def lost_after_two_chunks(*args, **kwargs):
        if len(chunks) == 2:
            raise DatabaseError("user-portfolio-db", "server closed the connection unexpectedly")
        chunks.append(1)
        return real(*args, **kwargs)

    mocker.patch.object(adoption, "adopt", lost_after_two_chunks)
    cut = client.post(URL, json=body, headers=bearer(OPERATOR))

    assert cut.status_code == 503
    assert (
        world.applied() == 200 and audit_rows(world) == [] and baselines(world)["investment"][2] == "INITIAL_WATERMARK"
    )
    mocker.stopall()

    finished = client.post(URL, json=body, headers=bearer(OPERATOR))

    assert finished.status_code == 200 and finished.get_json()["entries"] == {"investment": 300, "withdrawal": 300}
    journal = world.p(
        "SELECT count(*), count(DISTINCT (queue, queue_id)) FROM consistency.journal WHERE kind = 'adopted'"
    )
    assert journal == [(800, 800)] and world.applied() == 800
    assert [row[4]["recorded"] for row in audit_rows(world)] == [{"investment": 300, "withdrawal": 300}]
    assert baselines(world)["investment"][2:4] == ("baseline action", "alice")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"before": "2026-01-01T00:00:00Z", "dry_run": True}, "reason"),
        ({"before": "2026-01-01T00:00:00Z", "reason": " ", "dry_run": True}, "reason"),
        ({"before": "2026-01-01T00:00:00", "reason": "r", "dry_run": True}, "before"),
        ({"before": "yesterday", "reason": "r", "dry_run": True}, "before"),
        ({"before": 1767225600, "reason": "r", "dry_run": True}, "before"),
        ({"before": "0001-01-01T00:00:00+01:00", "reason": "r", "dry_run": False}, "before"),
        ({"before": "9999-12-31T23:00:00Z", "reason": "r", "dry_run": False}, "before"),
        ({"before": "2026-01-01T00:00:00Z", "reason": "r"}, "dry_run"),
        ({"before": "2026-01-01T00:00:00Z", "reason": "r", "dry_run": "no"}, "dry_run"),
        ({"before": "2026-01-01T00:00:00Z", "reason": "r", "dry_run": False, "queue": "investment"}, "queue"),
        (["before"], "body"),
    ],
)
def test_a_bad_baseline_request_gets_400_naming_the_field_and_changes_nothing(client, auth, world, body, field) -> None:
    untouched = kept_state(world)

    answer = client.post(URL, json=body, headers=auth)

    assert answer.status_code == 400 and answer.get_json()["field"] == field, answer.get_json()
    assert kept_state(world) == untouched


def test_the_baseline_action_needs_an_operate_token(make_app, world: World) -> None:
    client = make_app(api_tokens=(READER,)).test_client()
    body = {"before": "2026-01-01T00:00:00Z", "reason": "r", "dry_run": False}

    assert client.post(URL, json=body).status_code == 401
    assert client.post(URL, json=body, headers=bearer(READER)).status_code == 403
    assert audit_rows(world) == [] and baselines(world) == {}
