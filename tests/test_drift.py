"""Drift checks against real PostgreSQL: each of the four kinds found and named, nothing on a consistent system,
the baseline's history and resolved or parked entries left out, no data changed, resumed after a restart, one at
a time across processes, audited when started by hand, and one per interval from the schedule."""

from __future__ import annotations

import itertools
import threading
import time
import uuid as uuidlib
from datetime import datetime

import psycopg2
import pytest

import drift
from db import pg_array
from devkit.net import wait_until
from drift import DRIFT_LOCK_KEY, DRIFT_SESSION, CheckRunning, DriftChecks
from drift_walk import FIRST_TRANSACTION_ID
from queries import query, table_query
from service import Service, service_of
from tests.test_metrics import scrape, value
from tests.tokens import OPERATOR, READER, bearer
from tests.world import Request, World

ACCOUNT, OTHER, NO_PORTFOLIO = "3000000001", "3000000002", "3999999999"
CHECKS = "/api/v1/consistency/drift-checks"
LATEST = "/api/v1/consistency/drift-checks/latest"
LONG_AGO = datetime.fromisoformat("2001-02-03T04:05:06+00:00")


def check_now(checks: DriftChecks, actor: str = "tester") -> dict:
    """Start a check and run it to its end in this thread; return its report."""
    started = checks.request(actor, None)
    assert checks.run_due() == started["id"]
    report = checks.latest()
    assert report["id"] == started["id"] and report["state"] == "done", report
    return report


def named(report: dict, kind: str) -> list[tuple]:
    """The entries or transactions a report names under one kind: (queue, queue_id, uuid), sorted."""
    return sorted((f["queue"], f["queue_id"], f["uuid"]) for f in report["findings"] if f["kind"] == kind)


def settle_behind_the_watermark(svc: Service) -> None:
    """Run cycles until the stored watermarks have passed every entry settled so far (one second of margin)."""
    svc.runner.run()
    time.sleep(1.1)
    assert svc.runner.run().outcome == "ok"


def backdated(world: World, queue: str, account: str, status: str = "COMPLETED", txn: bool = True) -> Request:
    """A settled entry that arrived long behind the watermark (a commit later than any window), never applied."""
    entry_uuid = str(uuidlib.uuid4())
    if txn:
        world.transaction_for(queue, account, entry_uuid)
    table = {"investment": "investment_queue", "withdrawal": "withdrawal_queue"}[queue]
    rows = world.q(
        f"INSERT INTO {table} (account_number, uuid, status, updated_at) VALUES (%s, %s, %s, %s) RETURNING queue_id",
        (account, entry_uuid, status, LONG_AGO),
    )
    return Request(queue, rows[0][0], entry_uuid, account)


def contents(world: World) -> dict[str, str]:
    """A fingerprint of every table of both databases but the drift checks' own."""
    found = {}
    for name, run in (("queue", world.q), ("portfolio", world.p)):
        tables = run(
            "SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables"
            " WHERE table_schema IN ('public', 'consistency') AND table_type = 'BASE TABLE'"
            " AND table_name NOT LIKE 'drift%%' ORDER BY 1"
        )
        for (table,) in tables:
            rows = run(f"SELECT coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t")
            found[f"{name}:{table}"] = rows[0][0]
    return found


@pytest.fixture
def consistent(svc: Service, world: World) -> dict[str, Request]:
    """A system the service has brought into agreement: every status applied, one entry parked, one open."""
    world.portfolio_for(ACCOUNT)
    world.portfolio_for(OTHER)
    made = {
        "completed": world.request("investment", ACCOUNT),
        "failed": world.request("investment", OTHER, "FAILED"),
        "cancelled": world.request("withdrawal", ACCOUNT, "CANCELLED"),
        "withdrawn": world.request("withdrawal", OTHER),
        "parked": world.request("investment", NO_PORTFOLIO, txn=False),
        "pending": world.request("withdrawal", ACCOUNT, "PENDING"),
    }
    settle_behind_the_watermark(svc)
    assert world.applied() == 4 and len(world.parked()) == 1
    for queue in ("investment", "withdrawal"):
        (position,) = world.p("SELECT updated_at FROM consistency.watermarks WHERE queue = %s", (queue,))
        newest = world.q(f"SELECT max(updated_at) FROM {queue}_queue")[0][0]
        assert position[0] >= newest  # every entry is behind the watermark: the check covers them all
    return made


def test_a_consistent_system_has_no_findings(svc: Service, consistent: dict[str, Request]) -> None:
    report = check_now(svc.drift)

    assert report["counts"] == dict.fromkeys(drift.DRIFT_KINDS, 0)
    assert report["findings"] == []
    # Six entries, four ledger records and five transactions, each read once.
    assert report["rows_read"] == 6 + 4 + 5
    assert report["error"] is None and report["finished_at"] >= report["started_at"]


def test_a_check_finds_each_of_the_five_kinds_and_names_them(
    svc: Service, world: World, consistent: dict[str, Request]
) -> None:
    unapplied = backdated(world, "withdrawal", ACCOUNT, "FAILED")
    corrected = world.finish(consistent["completed"], "FAILED")  # the queue changed a settled entry
    gone = consistent["withdrawn"]
    world.q("DELETE FROM withdrawal_queue WHERE queue_id = %s", (gone.queue_id,))
    world.p("UPDATE portfolio_transactions SET status = 'PENDING' WHERE id = %s", (consistent["failed"].uuid,))
    stray = world.transaction_for("investment", OTHER)
    world.p("UPDATE portfolio_transactions SET status = 'PROCESSED' WHERE id = %s", (stray,))
    # A uuid rewritten by hand, its updated_at kept (as a restore keeps it): behind the watermark, the row is another
    # entry, never applied, and the ledger's record of the one applied under its queue_id no longer matches the row.
    reused = consistent["cancelled"]
    rewritten = world.transaction_for("withdrawal", ACCOUNT)
    world.q("ALTER TABLE withdrawal_queue DISABLE TRIGGER withdrawal_queue_updated_at")
    world.q("UPDATE withdrawal_queue SET uuid = %s WHERE queue_id = %s", (rewritten, reused.queue_id))
    world.q("ALTER TABLE withdrawal_queue ENABLE TRIGGER withdrawal_queue_updated_at")

    report = check_now(svc.drift)

    assert report["counts"] == {
        "unapplied_entry": 2,
        "changed_entry": 2,
        "changed_transaction": 1,
        "unrecorded_transaction": 1,
        "reused_entry": 1,
    }
    assert named(report, "unapplied_entry") == sorted(
        [("withdrawal", unapplied.queue_id, unapplied.uuid), ("withdrawal", reused.queue_id, rewritten)]
    )
    assert named(report, "reused_entry") == [("withdrawal", reused.queue_id, reused.uuid)]
    assert named(report, "changed_entry") == sorted(
        [("investment", corrected.queue_id, corrected.uuid), ("withdrawal", gone.queue_id, gone.uuid)]
    )
    failed = consistent["failed"]
    assert named(report, "changed_transaction") == [("investment", failed.queue_id, failed.uuid)]
    assert named(report, "unrecorded_transaction") == [("investment", None, stray)]
    details = {(f["kind"], f["queue_id"]): f for f in report["findings"]}
    assert details[("unapplied_entry", unapplied.queue_id)]["detail"]["status"] == "FAILED"
    assert details[("unapplied_entry", unapplied.queue_id)]["account_number"] == ACCOUNT
    assert details[("changed_entry", corrected.queue_id)]["detail"] == {
        "applied_status": "COMPLETED",
        "queue_status": "FAILED",
        "queue_row": "changed",
    }
    assert details[("changed_entry", gone.queue_id)]["detail"]["queue_row"] == "gone"
    assert details[("changed_entry", gone.queue_id)]["account_number"] == OTHER  # from its transaction
    assert details[("changed_transaction", failed.queue_id)]["detail"] == {
        "applied_status": "FAILED",
        "mirrored_status": "FAILED",
        "transaction_status": "PENDING",
    }
    assert details[("unrecorded_transaction", None)]["txn_id"] == stray
    assert details[("reused_entry", reused.queue_id)]["detail"] == {
        "applied_status": "CANCELLED",
        "queue_uuid": rewritten,
        "queue_status": "CANCELLED",
    }
    assert details[("reused_entry", reused.queue_id)]["txn_id"] == reused.uuid


def test_the_baseline_history_and_resolved_and_parked_entries_are_not_findings(
    svc: Service, world: World, consistent: dict[str, Request]
) -> None:
    baseline = world.q("SELECT min(updated_at) FROM investment_queue")[0][0]
    world.p(
        "INSERT INTO consistency.baseline (queue, updated_at, queue_id, source) VALUES"
        " ('investment', %s, 0, 'INITIAL_WATERMARK'), ('withdrawal', %s, 0, 'INITIAL_WATERMARK')",
        (baseline, baseline),
    )
    history = backdated(world, "investment", ACCOUNT)  # settled before the baseline: applied by what ran before
    world.p("UPDATE portfolio_transactions SET status = 'PROCESSED', updated_at = %s WHERE id = %s",
            (LONG_AGO, history.uuid))  # fmt: skip
    old_stray = world.transaction_for("withdrawal", OTHER)
    world.p("UPDATE portfolio_transactions SET status = 'PROCESSED', updated_at = %s WHERE id = %s",
            (LONG_AGO, old_stray))  # fmt: skip
    dismissed = backdated(world, "withdrawal", OTHER)
    world.p(
        "INSERT INTO consistency.resolved_entries (queue, queue_id, uuid, reason, resolved_by)"
        " VALUES ('withdrawal', %s, %s, 'refunded by hand', 'alice')",
        (dismissed.queue_id, dismissed.uuid),
    )
    # A withdrawal settled after the baseline but never applied is still found: the baseline hides only its past.
    late = world.request("withdrawal", ACCOUNT, txn=False)
    world.p("UPDATE consistency.watermarks SET updated_at = now() WHERE queue = 'withdrawal'")
    new_stray = world.transaction_for("investment", OTHER)
    world.p("UPDATE portfolio_transactions SET status = 'PROCESSED' WHERE id = %s", (new_stray,))

    report = check_now(svc.drift)

    assert consistent["parked"].uuid in world.parked()  # parked, behind the watermark, not a finding
    assert named(report, "unapplied_entry") == [("withdrawal", late.queue_id, late.uuid)]
    assert named(report, "unrecorded_transaction") == [("investment", None, new_stray)]
    assert report["counts"]["changed_entry"] == report["counts"]["changed_transaction"] == 0


def test_a_check_changes_no_data(svc: Service, world: World, consistent: dict[str, Request]) -> None:
    backdated(world, "investment", ACCOUNT)
    world.finish(consistent["completed"], "CANCELLED")
    svc.drift.request("tester", "before and after")
    before = contents(world)

    assert svc.drift.run_due() is not None

    assert contents(world) == before
    assert sum(svc.drift.latest()["counts"].values()) == 2


def turn_free(world: World) -> bool:
    """Whether no session of the test's user-portfolio-db holds the drift checks' turn (its advisory lock)."""
    held = world.p(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        " WHERE d.datname = current_database() AND l.locktype = 'advisory' AND l.objid = %s",
        (DRIFT_LOCK_KEY & 0xFFFFFFFF,),
    )
    return held == [(0,)]


def test_a_stopped_check_resumes_from_its_stored_position_after_a_restart(
    svc: Service, world: World, consistent: dict[str, Request]
) -> None:
    first = world.q("SELECT min(queue_id) FROM investment_queue")[0][0]
    # The ledger lost the first entry's record: a finding in the first chunk, and its transaction one in the last.
    world.p("DELETE FROM consistency.applied_entries WHERE queue = 'investment' AND queue_id = %s", (first,))
    slow = DriftChecks(svc.settings, svc.queue_db, svc.portfolio_db, chunk_size=2, pause=30)
    check_id = slow.request("tester", None)["id"]
    running = threading.Thread(target=slow.run_due)
    running.start()
    wait_for_first_chunk(world)

    stopping = time.monotonic()
    slow.stop()  # as the service's close does: within its pause, not after it
    running.join(timeout=5)
    assert not running.is_alive() and time.monotonic() - stopping < 2
    ((state, rows_read, positions, counts),) = world.p(
        "SELECT state, rows_read, positions, counts FROM consistency.drift_checks"
    )
    assert (state, rows_read, positions) == ("running", 2, {"investment_entries": {"next": first + 2}})
    assert counts["unapplied_entry"] == 1

    # The stopped check's connection is closed; its server process lets the turn's lock go a moment later, as a
    # restarted process would find it.
    wait_until(lambda: turn_free(world), 10, "the turn to be free")
    restarted = DriftChecks(svc.settings, svc.queue_db, svc.portfolio_db, chunk_size=2, pause=0)
    assert restarted.run_due() == check_id  # the same check, not a new one

    report = restarted.latest()
    assert report["state"] == "done"
    assert report["rows_read"] == 6 + 3 + 5  # what was read before the stop is not read again
    assert report["counts"] == {
        **dict.fromkeys(drift.DRIFT_KINDS, 0),
        "unapplied_entry": 1,
        "unrecorded_transaction": 1,
    }
    assert named(report, "unapplied_entry") == [("investment", first, consistent["completed"].uuid)]
    assert world.p("SELECT count(*) FROM consistency.drift_checks") == [(1,)]


def wait_for_first_chunk(world: World) -> None:
    """Wait until the running check has stored its first chunk."""
    deadline = time.monotonic() + 10
    while not world.p("SELECT rows_read FROM consistency.drift_checks")[0][0]:
        assert time.monotonic() < deadline, "the check stored no chunk"
        time.sleep(0.02)


def test_only_one_check_runs_at_a_time_across_two_services(make_service, world: World) -> None:
    first, second = make_service(), make_service()
    first.runner.prepare()
    world.portfolio_for(ACCOUNT)
    for _ in range(3):
        world.request("investment", ACCOUNT)
    first.runner.run()
    slow = DriftChecks(first.settings, first.queue_db, first.portfolio_db, chunk_size=1, pause=30)
    check_id = slow.request("tester", None)["id"]
    running = threading.Thread(target=slow.run_due)
    running.start()
    wait_for_first_chunk(world)

    assert second.drift.run_due() is None  # the first holds the turn
    with pytest.raises(CheckRunning) as refused:
        second.drift.request("tester", None)
    assert refused.value.check_id == check_id
    assert world.p("SELECT count(*) FROM consistency.drift_checks") == [(1,)]

    # The first process dies: its connection goes, and the lock with it. The second resumes the same check.
    world.p(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = %s",
        (DRIFT_SESSION,),
    )
    wait_until(lambda: turn_free(world), 10, "the lock to go with its session")
    assert second.drift.run_due() == check_id
    assert second.drift.latest()["state"] == "done"
    assert second.drift.latest()["rows_read"] == 3 + 3 + 3
    slow.stop()
    running.join(timeout=5)


def test_a_database_error_fails_the_check_and_frees_the_way_for_the_next(svc: Service, world: World) -> None:
    svc.drift.request("tester", None)
    world.q("ALTER TABLE withdrawal_queue RENAME TO withdrawal_queue_away")
    try:
        svc.drift.run_due()
    finally:
        world.q("ALTER TABLE withdrawal_queue_away RENAME TO withdrawal_queue")

    report = svc.drift.latest()
    assert report["state"] == "failed" and "withdrawal_queue" in report["error"]
    assert report["positions"] == {"investment_entries": {"done": True}}
    assert check_now(svc.drift)["id"] == report["id"] + 1


def test_findings_kept_are_bounded_per_kind_and_counted_exactly(
    svc: Service, world: World, consistent: dict[str, Request], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drift, "FINDINGS_KEPT", 2)
    strays = sorted(world.transaction_for("investment", ACCOUNT) for _ in range(5))
    world.p("UPDATE portfolio_transactions SET status = 'PROCESSED' WHERE id = ANY(%s::uuid[])", (strays,))
    checks = DriftChecks(svc.settings, svc.queue_db, svc.portfolio_db, chunk_size=3)

    report = check_now(checks)

    assert report["counts"]["unrecorded_transaction"] == 5
    assert report["findings_kept_per_kind"] == 2
    assert named(report, "unrecorded_transaction") == [("investment", None, stray) for stray in strays[:2]]


def test_the_last_finished_check_sets_the_metrics(app, client, world: World) -> None:
    checks = service_of(app).drift
    types, samples = scrape(client)
    assert types["consistency_drift_findings"] == "gauge"
    assert {kind for (name, labels) in samples if name == "consistency_drift_findings" for _, kind in labels} == set(
        drift.DRIFT_KINDS
    )
    world.portfolio_for(ACCOUNT)
    for _ in range(2):
        stray = world.transaction_for("withdrawal", ACCOUNT)
        world.p("UPDATE portfolio_transactions SET status = 'PROCESSED' WHERE id = %s", (stray,))

    report = check_now(checks)
    _, samples = scrape(client)

    assert value(samples, "consistency_drift_findings", kind="unrecorded_transaction") == 2
    assert value(samples, "consistency_drift_findings", kind="unapplied_entry") == 0
    finished = datetime.fromisoformat(report["finished_at"]).timestamp()
    assert value(samples, "consistency_drift_last_check_timestamp_seconds") == pytest.approx(finished)

    world.p("UPDATE portfolio_transactions SET status = 'PENDING'")
    check_now(checks)
    assert value(scrape(client)[1], "consistency_drift_findings", kind="unrecorded_transaction") == 0


@pytest.fixture
def operators(make_app):
    """An app that accepts a reader and an operator, its state prepared, its threads not started."""
    flask_app = make_app(api_tokens=(READER, OPERATOR))
    service_of(flask_app).runner.prepare()
    return flask_app


def test_starting_a_check_is_audited_with_the_actor_from_the_token(operators, world: World) -> None:
    client = operators.test_client()
    body = {"reason": "month-end proof"}

    answer = client.post(CHECKS, headers=bearer(OPERATOR), json=body)

    assert answer.status_code == 202
    started = answer.get_json()
    assert (started["state"], started["started_by"]) == ("running", "alice")
    assert answer.headers["Location"] == LATEST
    audit = world.p("SELECT actor, action, target, reason FROM consistency.audit_log")
    assert audit == [("alice", "start_drift_check", {"drift_check": started["id"]}, "month-end proof")]
    refused = client.post(CHECKS, headers=bearer(OPERATOR))
    assert refused.status_code == 409 and refused.get_json()["id"] == started["id"]
    assert world.p("SELECT count(*) FROM consistency.audit_log") == [(1,)]  # the refused one is not audited

    running = client.get(LATEST, headers=bearer(READER)).get_json()
    assert (running["id"], running["state"], running["reason"]) == (started["id"], "running", "month-end proof")
    assert service_of(operators).drift.run_due() == started["id"]
    report = client.get(LATEST, headers=bearer(READER)).get_json()
    assert report["state"] == "done" and report["counts"] == dict.fromkeys(drift.DRIFT_KINDS, 0)


def test_the_drift_endpoints_need_a_token_and_starting_needs_the_operate_role(operators, world: World) -> None:
    client = operators.test_client()
    assert client.get(LATEST).status_code == 401
    assert client.post(CHECKS).status_code == 401
    refused = client.post(CHECKS, headers=bearer(READER), json={"reason": "curious"})
    assert refused.status_code == 403
    assert world.p("SELECT count(*) FROM consistency.drift_checks") == [(0,)]
    assert world.p("SELECT count(*) FROM consistency.audit_log") == [(0,)]
    missing = client.get(LATEST, headers=bearer(READER))
    assert missing.status_code == 404 and "no drift check" in missing.get_json()["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"reason": ""}, "reason"), ({"reason": 5}, "reason"), ({"actor": "mallory"}, "actor"), ([1], "body")],
)
def test_a_bad_request_body_is_refused_naming_the_field(operators, world: World, body, field: str) -> None:
    answer = operators.test_client().post(CHECKS, headers=bearer(OPERATOR), json=body)
    assert (answer.status_code, answer.get_json()["field"]) == (400, field)
    assert world.p("SELECT count(*) FROM consistency.drift_checks") == [(0,)]


def test_the_schedule_starts_one_check_per_interval_across_two_services(make_service, world: World) -> None:
    services = [make_service(drift_check_interval=1.0) for _ in range(2)]
    for each in services:
        each.runner.prepare()
    started = time.monotonic()
    for each in services:
        each.start()
    time.sleep(3.6)
    for each in services:
        each.close()
    elapsed = time.monotonic() - started

    checks = world.p("SELECT started_by, state, started_at FROM consistency.drift_checks ORDER BY id")
    assert 2 <= len(checks) <= elapsed // 1.0 + 1, checks
    assert {by for by, _, _ in checks} == {"schedule"}
    # Each ran to its end, but the last, which the close may have stopped mid-way: it stays to be resumed.
    assert {state for _, state, _ in checks[:-1]} == {"done"} and checks[-1][1] in {"done", "running"}
    gaps = [(b[2] - a[2]).total_seconds() for a, b in itertools.pairwise(checks)]
    assert min(gaps) >= 1.0, gaps


def test_no_check_is_scheduled_with_an_interval_of_zero(make_service, world: World) -> None:
    service = make_service(drift_check_interval=0.0)
    service.runner.prepare()
    assert service.drift.run_due() is None
    assert world.p("SELECT count(*) FROM consistency.drift_checks") == [(0,)]
    service.drift.request("tester", None)  # a check asked for still runs
    assert service.drift.run_due() is not None


def plan_nodes(plan: dict) -> list[dict]:
    """Flatten an EXPLAIN (FORMAT JSON) plan into its nodes."""
    return [plan, *(node for child in plan.get("Plans", []) for node in plan_nodes(child))]


def rows_touched(conn, statement, params: dict) -> int:
    """Run a chunk's statement under EXPLAIN ANALYZE, as a check runs it; return the most rows any node handled."""
    with conn.cursor() as cur:
        cur.execute(query("drift_keyset_plan"))
        text = statement if isinstance(statement, str) else statement.as_string(cur)
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + text, params)
        nodes = plan_nodes(cur.fetchone()[0][0]["Plan"])
    conn.rollback()
    assert not [n for n in nodes if n["Node Type"] in {"Sort", "Seq Scan"} and n["Actual Rows"]], nodes
    return max(node["Actual Rows"] * node["Actual Loops"] for node in nodes)


def test_each_chunk_reads_along_its_index_however_stale_the_statistics(world: World, dbs) -> None:
    # 3000 of everything, loaded at once and never analyzed: each table looks empty to the planner.
    world.q(
        "INSERT INTO investment_queue (account_number, uuid, status)"
        " SELECT 'a', md5(n::text)::uuid::text, 'COMPLETED' FROM generate_series(1, 3000) AS n"
    )
    world.portfolio_for(ACCOUNT)
    world.p(
        "INSERT INTO portfolio_transactions (id, accountid, transaction_type, status)"
        " SELECT md5(n::text)::uuid, %s, 'INVEST', 'PROCESSED' FROM generate_series(1, 3000) AS n",
        (ACCOUNT,),
    )
    world.p(
        "INSERT INTO consistency.applied_entries (queue, queue_id, txn_id, status)"
        " SELECT 'investment', n, md5(n::text)::uuid, 'COMPLETED' FROM generate_series(1, 3000) AS n"
    )
    queue, portfolio = psycopg2.connect(dbs[0]), psycopg2.connect(dbs[1])
    try:
        chunk = {"next": 100, "limit": 11}
        entries = world.q("SELECT queue_id, updated_at, uuid FROM investment_queue WHERE queue_id BETWEEN 100 AND 110")
        looked_up = {
            "queue_ids": pg_array(e[0] for e in entries),
            "updated": pg_array(e[1] for e in entries),
            "uuids": pg_array(e[2] for e in entries),
        }
        touched = {
            "queue": rows_touched(queue, table_query("drift_queue_chunk", "investment_queue"), chunk),
            "unapplied": rows_touched(portfolio, query("drift_unapplied"), {"queue": "investment", **looked_up}),
            "ledger": rows_touched(portfolio, query("drift_ledger_chunk"), {"queue": "investment", **chunk}),
            "transactions": rows_touched(
                portfolio,
                query("drift_transaction_chunk"),
                {**chunk, "next": FIRST_TRANSACTION_ID, "types": "{INVEST,WITHDRAWAL}", "queues": "{investment,x}"},
            ),
        }
    finally:
        queue.close()
        portfolio.close()
    # A chunk's 11 rows (the transactions' twice: each is matched against the two transaction types), never the
    # 2900 rows after the key that a sort would read.
    assert touched == {"queue": 11, "unapplied": 11, "ledger": 11, "transactions": 22}
