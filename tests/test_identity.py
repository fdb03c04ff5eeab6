"""Money moves once per portfolio transaction, however many queue rows name it; later changes are corrections."""

from __future__ import annotations

import logging
import uuid as uuidlib
from fractions import Fraction

import psycopg2
import psycopg2.errors
import pytest

from apply import apply_each_entry
from domain import INVESTMENT, Entry
from tests.world import (
    STAMP,
    Request,
    World,
    claim_raced,
    expected,
)

ACCOUNT = "1000000001"
RISE = ("1100000", "1000000")  # TIER1_MV / TIER1 with TIER1_MV = 1100000


def settled_once(world: World, txn: str) -> None:
    """Assert that a completed investment moved the portfolio exactly once."""
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", RISE)
    assert world.txn_status(txn) == "PROCESSED"


def settled_by(request: Request) -> str:
    """The reason a later row naming this request's transaction is parked with."""
    return f"portfolio transaction already settled by {request.queue} entry {request.queue_id}"


@pytest.fixture
def rising(world: World) -> World:
    """A portfolio and a rise of tier 1, so that every application shows in tier1_value."""
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1100000")
    return world


@pytest.mark.parametrize(
    ("queue", "respell"),
    [("investment", str.upper), ("withdrawal", lambda text: text.replace("-", ""))],
    ids=["upper-case", "no-hyphens"],
)
def test_a_second_spelling_of_one_transaction_moves_no_money(svc, rising: World, queue, respell) -> None:
    first = rising.request(queue, ACCOUNT)
    before = rising.amounts(ACCOUNT)
    svc.runner.run()
    after_first = rising.amounts(ACCOUNT)
    second = rising.finish(rising.enqueue(queue, ACCOUNT, respell(first.uuid), txn=False))

    summary = svc.runner.run().to_json()

    assert rising.amounts(ACCOUNT) == after_first != before
    assert summary["counts"][queue]["parked"] == 1
    assert rising.parked() == {second.uuid: settled_by(first)}
    assert rising.txn_status(first.uuid) == "PROCESSED"


def test_a_deleted_and_requeued_transaction_moves_no_money_again(svc, rising: World) -> None:
    first = rising.request("investment", ACCOUNT)
    svc.runner.run()
    rising.q("DELETE FROM investment_queue WHERE queue_id = %s", (first.queue_id,))
    again = rising.finish(rising.enqueue("investment", ACCOUNT, first.uuid, txn=False))

    svc.runner.run()
    svc.runner.run()

    settled_once(rising, first.uuid)
    assert rising.parked() == {again.uuid: settled_by(first)}


def test_a_settled_transaction_queued_again_and_failed_keeps_its_status(svc, rising: World) -> None:
    first = rising.request("investment", ACCOUNT)
    svc.runner.run()
    second = rising.finish(rising.enqueue("investment", ACCOUNT, first.uuid.upper(), txn=False), "FAILED")

    summary = svc.runner.run().to_json()

    settled_once(rising, first.uuid)
    assert summary["counts"]["investment"]["parked"] == 1
    assert rising.parked() == {second.uuid: settled_by(first)}
    assert rising.p("SELECT queue_id, txn_id::text FROM consistency.applied_entries") == [(first.queue_id, first.uuid)]


def test_two_spellings_in_one_batch_apply_the_first_only(svc, rising: World) -> None:
    completed = rising.enqueue("investment", ACCOUNT)
    failed = rising.enqueue("investment", ACCOUNT, completed.uuid.upper(), txn=False)
    rising.q(
        "UPDATE investment_queue SET status = CASE queue_id WHEN %s THEN 'COMPLETED' ELSE 'FAILED' END"
        " WHERE queue_id IN (%s, %s)",
        (completed.queue_id, completed.queue_id, failed.queue_id),
    )

    summary = svc.runner.run().to_json()

    assert summary["counts"]["investment"]["read"] == 2
    assert (summary["counts"]["investment"]["COMPLETED"], summary["counts"]["investment"]["parked"]) == (1, 1)
    settled_once(rising, completed.uuid)
    assert rising.parked() == {failed.uuid: settled_by(completed)}


def test_a_parked_duplicate_stays_parked_and_moves_no_money_on_every_retry(svc, rising: World) -> None:
    first = rising.request("investment", ACCOUNT)
    svc.runner.run()
    rising.finish(rising.enqueue("investment", ACCOUNT, first.uuid.upper(), txn=False))
    for _ in range(3):
        svc.runner.run()
    settled_once(rising, first.uuid)
    assert rising.p("SELECT uuid, reason, attempts FROM consistency.parked_entries") == [
        (first.uuid.upper(), settled_by(first), 3)
    ]


def test_the_database_refuses_a_second_claim_of_one_transaction_from_another_process(
    settings, rising: World, svc
) -> None:
    first = rising.request("investment", ACCOUNT)
    second = rising.finish(rising.enqueue("investment", ACCOUNT, first.uuid.upper(), txn=False))
    rows = rising.q("SELECT queue_id, account_number, uuid, status, updated_at FROM investment_queue ORDER BY queue_id")
    entries = [Entry(*row) for row in rows]
    factors = (Fraction(11, 10), Fraction(1), Fraction(1))
    outcome = claim_raced(
        settings.portfolio_db_uri,
        lambda cur: apply_each_entry(cur, INVESTMENT, entries[:1], factors, STAMP),
        lambda cur: apply_each_entry(cur, INVESTMENT, entries[1:], factors, STAMP),
    )

    assert outcome == {"parked": 1}
    settled_once(rising, first.uuid)
    assert rising.parked() == {second.uuid: settled_by(first)}


@pytest.mark.parametrize(
    ("applied", "corrected", "mirrored"),
    [("COMPLETED", "FAILED", "PROCESSED"), ("FAILED", "COMPLETED", "FAILED"), ("CANCELLED", "COMPLETED", "CANCELLED")],
)
def test_a_correction_of_a_settled_entry_is_kept_shown_and_never_applied(
    app, client, auth, rising: World, caplog, applied: str, corrected: str, mirrored: str
) -> None:
    from service import service_of

    svc = service_of(app)
    request = rising.request("investment", ACCOUNT, applied)
    svc.poller.run_once(0)
    settled = rising.amounts(ACCOUNT)
    rising.finish(request, corrected)

    with caplog.at_level(logging.WARNING, logger="apply"):
        summary = svc.poller.run_once(0).to_json()

    assert summary["counts"]["investment"]["corrected"] == 1
    assert rising.amounts(ACCOUNT) == settled  # no second application, no reversal
    assert rising.txn_status(request.uuid) == mirrored
    warnings = [r.getMessage() for r in caplog.records if r.name == "apply"]
    assert warnings == [
        f"investment entry {request.queue_id} (portfolio transaction {request.uuid}) was applied as {applied} and"
        f" is now {corrected} in the queue: the applied outcome stays, and GET /api/v1/consistency/corrections"
        " lists it"
    ]
    listed = client.get("/api/v1/consistency/corrections", headers=auth).get_json()
    assert listed["count"] == 1
    assert {k: listed["entries"][0][k] for k in ("queue", "queue_id", "uuid", "applied_status", "queue_status")} == {
        "queue": "investment",
        "queue_id": request.queue_id,
        "uuid": request.uuid,
        "applied_status": applied,
        "queue_status": corrected,
    }
    assert client.get("/api/v1/consistency/status").get_json()["corrections"] == 1


def test_a_correction_is_noticed_once_and_ends_when_the_queue_agrees_again(svc, rising: World, caplog) -> None:
    request = rising.request("investment", ACCOUNT)
    svc.runner.run()
    holder = psycopg2.connect(rising.queue_uri)  # an open transaction holds the watermark: rows are read again
    holder.cursor().execute("SELECT 1")
    rising.finish(request, "FAILED")
    with caplog.at_level(logging.WARNING, logger="apply"):
        first = svc.runner.run().to_json()
        again = svc.runner.run().to_json()
    holder.close()
    assert again["counts"]["investment"]["read"] == 1
    noticed = [r for r in caplog.records if r.name == "apply"]
    assert (first["counts"]["investment"]["corrected"], len(noticed)) == (1, 1)
    assert again["counts"]["investment"]["corrected"] == 0
    assert rising.p("SELECT queue_status FROM consistency.corrections") == [("FAILED",)]

    rising.finish(request, "COMPLETED")
    svc.runner.run()

    assert rising.p("SELECT count(*) FROM consistency.corrections") == [(0,)]
    settled_once(rising, request.uuid)


@pytest.mark.parametrize("status", ["completed", "Completed", "COMPLETED ", "REFUNDED", "", None])
def test_an_unknown_status_is_parked_with_it_shown_and_applied_once_when_fixed(svc, rising: World, status) -> None:
    rising.q("ALTER TABLE investment_queue DROP CONSTRAINT investment_queue_status_check")
    rising.q("ALTER TABLE investment_queue ALTER COLUMN status DROP NOT NULL")
    request = rising.finish(rising.enqueue("investment", ACCOUNT), status)

    summary = svc.runner.run().to_json()

    shown = "NULL" if status is None else "'" + status + "'"
    assert summary["counts"]["investment"]["parked"] == 1
    assert rising.parked() == {request.uuid: f"unknown status {shown}"}
    svc.runner.run()  # retried as the row stands: still parked, not released
    assert rising.parked() == {request.uuid: f"unknown status {shown}"}
    assert rising.txn_status(request.uuid) == "PENDING"

    rising.finish(request, "COMPLETED")
    svc.runner.run()
    svc.runner.run()

    assert rising.parked() == {}
    settled_once(rising, request.uuid)


def test_entries_recorded_before_the_upgrade_keep_one_settlement_per_transaction(world: World, pg: str) -> None:
    """Migration 3 gives each recorded entry its transaction; of two that named one, the first keeps it."""
    import migrations
    from devkit import ROOT, postgres

    name = postgres.unique_name("cm_upgrade")
    postgres.admin(pg, f'CREATE DATABASE "{name}"')
    uri = postgres.with_database(pg, name)
    txn = str(uuidlib.uuid4())
    try:
        conn = psycopg2.connect(uri)
        with conn, conn.cursor() as cur:
            cur.execute((ROOT / "schema" / "user_portfolio_db.sql").read_text())
            cur.execute("CREATE SCHEMA consistency")
            for _, _, path in migrations.available_migrations()[:2]:
                cur.execute(path.read_text())
            cur.execute(
                "INSERT INTO consistency.applied_entries (queue, queue_id, uuid, status, applied_at) VALUES"
                " ('investment', 1, %s, 'COMPLETED', now() - interval '1 hour'),"
                " ('investment', 2, %s, 'COMPLETED', now()), ('withdrawal', 3, 'not-a-uuid', 'FAILED', now())",
                (txn, txn.upper()),
            )
            cur.execute(
                "CREATE TABLE consistency.schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            cur.execute("INSERT INTO consistency.schema_migrations (version, name) VALUES (1, 'state'), (2, 'set')")
        with conn, conn.cursor() as cur:
            assert migrations.migrate(cur)[0] == 3  # and whatever migrations came after it
            cur.execute("SELECT queue_id, txn_id::text FROM consistency.applied_entries ORDER BY queue_id")
            assert cur.fetchall() == [(1, txn), (2, None), (3, None)]
        conn.close()
    finally:
        postgres.drop(pg, name)


def test_the_retired_apply_batch_refuses_so_an_older_release_cannot_apply_without_the_guarantee(
    svc, world: World
) -> None:
    with pytest.raises(psycopg2.errors.FeatureNotSupported) as refused:
        world.p("SELECT * FROM consistency.apply_batch('investment', 'INVEST', 'values', false, '{1}', '{1}')")
    assert "retired by migration 3" in str(refused.value)
    assert world.p("SELECT count(*) FROM pg_proc WHERE proname = 'apply_batch_v2'") == [(1,)]


def test_corrections_found_entry_by_entry_are_each_named_once(svc, rising: World, caplog) -> None:
    first, second = (rising.request("investment", ACCOUNT) for _ in range(2))
    svc.runner.run()
    holder = psycopg2.connect(rising.queue_uri)  # holds the watermark, so the rejected batch is read again
    holder.cursor().execute("SELECT 1")
    rising.finish(first, "FAILED")
    rising.finish(second, "CANCELLED")
    rejected = rising.request("investment", ACCOUNT)
    # A rule of the portfolio owner's that the service does not know about: the batch goes entry by entry.
    rising.p("ALTER TABLE user_portfolios ADD CONSTRAINT tier1_cap CHECK (tier1_value < 1300)")

    with caplog.at_level(logging.WARNING, logger="apply"):
        summary = svc.runner.run().to_json()
    holder.close()

    named = sorted(r.queue_id for r in caplog.records if r.name == "apply")
    assert named == [first.queue_id, second.queue_id]
    assert summary["counts"]["investment"]["corrected"] == 2
    assert "tier1_cap" in rising.parked()[rejected.uuid]
