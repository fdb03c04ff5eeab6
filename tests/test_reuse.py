"""A queue row is the same entry only under the same transaction: a queue_id that comes back carrying another one
(queue-db restored from a backup, a uuid rewritten) is a new entry, applied once, and the reuse is shown."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from db import pg_array
from queries import query
from tests.world import TABLES, Request, World, expected

ACCOUNT = "1000000001"
RISE = ("1100000", "1000000")  # TIER1_MV / TIER1 with TIER1_MV = 1100000


@pytest.fixture
def rising(world: World) -> World:
    """A portfolio and a rise of tier 1, so that every application shows in tier1_value."""
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1100000")
    return world


def reuse(world: World, earlier: Request, status: str = "COMPLETED", txn: str | None = None) -> Request:
    """Give a new request the queue_id of an earlier one, as a queue-db restored from a dump does; settle it."""
    table = TABLES[earlier.queue]
    world.q(f"DELETE FROM {table} WHERE queue_id = %s", (earlier.queue_id,))
    uuid = txn or world.transaction_for(earlier.queue, earlier.account)
    world.q(
        f"INSERT INTO {table} (queue_id, account_number, tier_1, tier_2, tier_3, uuid) VALUES (%s, %s, 10, 20, 30, %s)",
        (earlier.queue_id, earlier.account, uuid),
    )
    return world.finish(Request(earlier.queue, earlier.queue_id, uuid, earlier.account), status)


def ledger(world: World, request: Request) -> list[tuple[str, str]]:
    """The ledger's records of a queue_id: (transaction, status), oldest first."""
    return world.p(
        "SELECT txn_id::text, status FROM consistency.applied_entries WHERE queue = %s AND queue_id = %s"
        " ORDER BY applied_at",
        (request.queue, request.queue_id),
    )


def reuses(world: World) -> list[tuple]:
    """The reuses kept: (queue, queue_id, earlier transaction, transaction now)."""
    return world.p(
        "SELECT queue, queue_id, earlier_txn_id::text, txn_id::text FROM consistency.reused_entries ORDER BY id"
    )


def reused_counted(client) -> float:
    """The metric of reused investment queue rows, as /metrics serves it."""
    (family,) = [f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
                 if f.name == "consistency_reused_entries"]  # fmt: skip
    return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["queue"] == "investment")


def test_a_reused_queue_id_with_a_new_transaction_is_applied_once_as_a_new_entry(
    svc, rising: World, client, auth, caplog
) -> None:
    earlier = rising.request("investment", ACCOUNT)
    svc.runner.run()
    later = reuse(rising, earlier)

    counted = reused_counted(client)
    with caplog.at_level(logging.WARNING):
        summary = svc.poller.run_once().to_json()
    svc.poller.run_once()  # read again: nothing moves, nothing is noticed twice

    assert rising.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", RISE, RISE)  # both moved money, once each
    assert (rising.txn_status(earlier.uuid), rising.txn_status(later.uuid)) == ("PROCESSED", "PROCESSED")
    assert ledger(rising, later) == [(earlier.uuid, "COMPLETED"), (later.uuid, "COMPLETED")]
    assert summary["counts"]["investment"]["reused"] == 1 and summary["counts"]["investment"]["COMPLETED"] == 1
    assert reuses(rising) == [("investment", later.queue_id, earlier.uuid, later.uuid)]
    assert rising.p("SELECT count(*) FROM consistency.corrections") == [(0,)]
    warned = [r.getMessage() for r in caplog.records if "now carries" in r.getMessage()]
    assert len(warned) == 1 and all(text in warned[0] for text in (str(later.queue_id), earlier.uuid, later.uuid))
    kinds = rising.p(
        "SELECT kind FROM consistency.journal WHERE queue = 'investment' AND queue_id = %s ORDER BY id",
        (later.queue_id,),
    )
    assert kinds == [("applied",), ("reused",), ("applied",)]

    svc.cache.forget()
    status = client.get("/api/v1/consistency/status").get_json()
    listed = client.get("/api/v1/consistency/reused-entries", headers=auth).get_json()
    assert status["reused_entries"] == 1
    assert listed["count"] == 1 and listed["next_before"] is None
    (shown,) = listed["entries"]
    assert (shown["queue_id"], shown["earlier_transaction"], shown["portfolio_transaction"], shown["state"]) == (
        later.queue_id,
        earlier.uuid,
        later.uuid,
        "applied",
    )
    assert reused_counted(client) == counted + 1


def test_a_reused_queue_id_that_settles_otherwise_is_a_new_entry_not_a_correction(svc, rising: World) -> None:
    earlier = rising.request("withdrawal", ACCOUNT)
    svc.runner.run()
    before = rising.amounts(ACCOUNT)
    later = reuse(rising, earlier, "FAILED")

    svc.runner.run()

    assert rising.amounts(ACCOUNT) == before
    assert rising.txn_status(later.uuid) == "FAILED"
    assert ledger(rising, later) == [(earlier.uuid, "COMPLETED"), (later.uuid, "FAILED")]
    assert rising.p("SELECT count(*) FROM consistency.corrections") == [(0,)]
    assert len(reuses(rising)) == 1


def test_a_reused_queue_id_naming_a_settled_transaction_is_parked_as_a_duplicate(svc, rising: World) -> None:
    settled = rising.request("investment", ACCOUNT)
    earlier = rising.request("investment", ACCOUNT)
    svc.runner.run()
    after = rising.amounts(ACCOUNT)
    later = reuse(rising, earlier, txn=settled.uuid.upper())  # queue-db keeps each spelling once

    svc.runner.run()
    svc.runner.run()  # a retry of the parking notices nothing new

    assert rising.amounts(ACCOUNT) == after
    reason = f"portfolio transaction already settled by investment entry {settled.queue_id}"
    assert rising.parked() == {later.uuid: reason}
    assert ledger(rising, later) == [(earlier.uuid, "COMPLETED")]
    assert reuses(rising) == [("investment", later.queue_id, earlier.uuid, settled.uuid)]
    assert rising.p("SELECT count(*) FROM consistency.corrections") == [(0,)]


def test_a_parked_reused_row_can_be_resolved_and_a_resolved_row_reused_is_applied(
    svc, rising: World, client, auth
) -> None:
    settled = rising.request("investment", ACCOUNT)
    earlier = rising.request("investment", ACCOUNT)
    svc.runner.run()
    duplicate = reuse(rising, earlier, txn=settled.uuid.upper())
    svc.runner.run()
    path = f"/api/v1/consistency/parked/investment/{duplicate.queue_id}/resolve"

    answer = client.post(path, json={"reason": "queued twice after the restore"}, headers=auth)

    assert answer.status_code == 200, answer.get_json()  # applied under another transaction, not this one
    assert rising.parked() == {}
    # The row comes to carry yet another transaction: another entry again, which the resolution does not cover.
    again = reuse(rising, earlier)
    svc.runner.run()
    assert rising.txn_status(again.uuid) == "PROCESSED"
    assert [txn for txn, _ in ledger(rising, again)] == [earlier.uuid, again.uuid]


def test_an_entrys_story_shows_every_transaction_its_row_carried_and_which_applied(
    svc, rising: World, client, auth
) -> None:
    earlier = rising.request("investment", ACCOUNT)
    svc.runner.run()
    later = reuse(rising, earlier)
    path = f"/api/v1/consistency/entries/investment/{later.queue_id}"

    waiting = client.get(path, headers=auth).get_json()
    svc.runner.run()
    told = client.get(path, headers=auth).get_json()

    assert (waiting["state"], waiting["ledger"]) == ("not applied yet", None)
    assert [(t["portfolio_transaction"], t["applied"], t["carried_now"]) for t in waiting["transactions"]] == [
        (earlier.uuid, True, False),
        (later.uuid, False, True),
    ]
    assert (told["state"], told["ledger"]["portfolio_transaction"]) == ("applied", later.uuid)
    assert [(t["portfolio_transaction"], t["applied"], t["carried_now"]) for t in told["transactions"]] == [
        (earlier.uuid, True, False),
        (later.uuid, True, True),
    ]
    assert [r["earlier_transaction"] for r in told["reuses"]] == [earlier.uuid]
    assert [r["kind"] for r in told["records"]] == ["applied", "reused", "applied"]
    page = client.get(f"/api/v1/consistency/journal?account={ACCOUNT}", headers=auth).get_json()
    about = [(r["kind"], r["portfolio_transaction"]) for r in reversed(page["entries"])]
    assert about == [("applied", earlier.uuid), ("reused", later.uuid), ("applied", later.uuid)]


def test_the_sweep_finds_a_reused_row_that_the_ledger_holds_under_another_transaction(svc, rising: World) -> None:
    earlier = rising.request("investment", ACCOUNT)
    svc.runner.run()
    later = reuse(rising, earlier)
    unrelated = rising.request("investment", ACCOUNT)  # never applied: found as any entry is
    ids = [earlier.queue_id, unrelated.queue_id]

    with svc.portfolio_db.transaction() as cur:
        cur.execute(
            query("filter_unapplied"),
            {"queue": "investment", "queue_ids": pg_array(ids), "uuids": pg_array([later.uuid, unrelated.uuid])},
        )
        missing = sorted(row[0] for row in cur.fetchall())
        cur.execute(
            query("filter_unapplied"),
            {"queue": "investment", "queue_ids": pg_array(ids[:1]), "uuids": pg_array([earlier.uuid.upper()])},
        )
        applied = cur.fetchall()

    assert missing == sorted(ids)
    assert applied == []  # the same transaction in another spelling: the same entry, applied
