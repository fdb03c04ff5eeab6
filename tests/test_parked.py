"""Entries that cannot be applied are parked with a reason, never block others, and apply once when fixed."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.world import (
    STAMP,
    World,
    expected,
)

ACCOUNT, OTHER = "1000000001", "1000000002"


def test_an_entry_for_a_missing_portfolio_is_parked_then_applied_once_when_it_appears(svc, world: World) -> None:
    world.portfolio_for(OTHER)
    world.set_tiers(TIER1_MV="1100000")
    orphan = world.request("investment", ACCOUNT, txn=False)
    fine = world.request("investment", OTHER)

    summary = svc.runner.run().to_json()

    assert summary["counts"]["investment"]["parked"] == 1
    assert world.parked() == {orphan.uuid: f"no portfolio for account {ACCOUNT}"}
    assert world.txn_status(fine.uuid) == "PROCESSED"  # not blocked by the parked entry
    # Retried every cycle, still parked, counted as attempts.
    svc.runner.run()
    assert world.p("SELECT attempts FROM consistency.parked_entries")[0][0] == 2

    world.portfolio_for(ACCOUNT)
    world.transaction_for("investment", ACCOUNT, orphan.uuid)
    svc.runner.run()
    svc.runner.run()

    assert world.parked() == {}
    assert world.txn_status(orphan.uuid) == "PROCESSED"
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", ("1100000", "1000000"))
    assert world.applied() == 2


def test_an_entry_without_a_transaction_row_is_parked(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    request = world.request("withdrawal", ACCOUNT, "FAILED", txn=False)

    svc.runner.run()

    assert world.parked() == {request.uuid: "no portfolio transaction with this id"}
    world.transaction_for("withdrawal", ACCOUNT, request.uuid)
    svc.runner.run()
    assert world.parked() == {}
    assert world.txn_status(request.uuid) == "FAILED"


def test_a_withdrawal_that_would_go_negative_is_parked_until_the_tiers_change(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="2500000")  # del_t1 = 1.5, so 1 - del = -0.5
    before = world.amounts(ACCOUNT)
    request = world.request("withdrawal", ACCOUNT)

    svc.runner.run()

    assert world.parked() == {request.uuid: "result would be negative"}
    assert world.amounts(ACCOUNT) == before
    assert world.txn_status(request.uuid) == "PENDING"

    world.set_tiers(TIER1_MV="1500000")
    svc.runner.run()
    assert world.parked() == {}
    assert world.amounts(ACCOUNT)["tier1_allocation"] == expected("100.00", ("500000", "1000000"))


def test_a_mismatched_transaction_is_parked_with_the_reason(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    world.portfolio_for(OTHER)
    entry_uuid = world.transaction_for("investment", OTHER)
    wrong_account = world.finish(world.enqueue("investment", ACCOUNT, entry_uuid, txn=False))
    wrong_type = world.finish(world.enqueue("withdrawal", ACCOUNT, world.transaction_for("investment", ACCOUNT), False))

    svc.runner.run()

    assert world.parked() == {
        wrong_account.uuid: f"portfolio transaction belongs to account {OTHER}",
        wrong_type.uuid: "portfolio transaction is INVEST, expected WITHDRAWAL",
    }


def test_a_malformed_uuid_is_parked_not_fatal(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    bad = world.finish(world.enqueue("investment", ACCOUNT, "not-a-uuid", txn=False), "CANCELLED")
    good = world.request("investment", ACCOUNT, "CANCELLED")

    assert svc.runner.run().to_json()["result"] == "ok"

    assert world.parked() == {bad.uuid: "uuid is not a valid UUID"}
    assert world.txn_status(good.uuid) == "CANCELLED"


def test_a_copied_batch_brings_its_transaction_ids_unless_a_uuid_is_not_one(world: World) -> None:
    import psycopg2

    from apply import copy_batch, load_copied
    from domain import INVESTMENT
    from queue_pass import START

    world.portfolio_for(ACCOUNT)
    good = world.request("investment", ACCOUNT, "CANCELLED")
    bad = world.finish(world.enqueue("investment", ACCOUNT, "not-a-\tuuid", txn=False), "CANCELLED")
    batch = "SELECT queue_id, uuid, txn_id::text FROM pg_temp.cm_batch ORDER BY queue_id"
    qconn, pconn = psycopg2.connect(world.queue_uri), psycopg2.connect(world.portfolio_uri)
    try:
        with qconn.cursor() as qcur:
            first, both = copy_batch(qcur, INVESTMENT, START, 1), copy_batch(qcur, INVESTMENT, START, 10)
        with pconn.cursor() as cur:
            assert load_copied(cur, first)[0] == 1
            cur.execute(batch)
            assert cur.fetchall() == [(good.queue_id, good.uuid, good.uuid)]  # read as a UUID by the COPY itself
            pconn.rollback()
            assert load_copied(cur, both)[0] == 2
            cur.execute(batch)
            assert cur.fetchall() == [(good.queue_id, good.uuid, None), (bad.queue_id, "not-a-\tuuid", None)]
    finally:
        qconn.close()
        pconn.close()


def test_a_constraint_violation_parks_only_the_rejected_entry(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT, values=("900.00", "0.00", "0.00"))
    world.portfolio_for(OTHER, values=("10.00", "0.00", "0.00"))
    # A rule of the portfolio owner's that the service does not know about.
    world.p("ALTER TABLE user_portfolios ADD CONSTRAINT tier1_cap CHECK (tier1_value < 1000)")
    world.set_tiers(TIER1_MV="1200000")
    rejected = world.request("investment", ACCOUNT)
    accepted = world.request("investment", OTHER)

    summary = svc.runner.run().to_json()

    assert summary["result"] == "ok"
    assert world.parked() == {
        rejected.uuid: 'rejected by the database: new row for relation "user_portfolios" violates check '
        'constraint "tier1_cap"'
    }
    assert world.amounts(ACCOUNT)["tier1_value"] == Decimal("900.00")
    assert world.txn_status(rejected.uuid) == "PENDING"
    assert world.amounts(OTHER)["tier1_value"] == Decimal("12.00")
    assert world.txn_status(accepted.uuid) == "PROCESSED"

    world.p("ALTER TABLE user_portfolios DROP CONSTRAINT tier1_cap")
    svc.runner.run()
    assert world.parked() == {}
    assert world.amounts(ACCOUNT)["tier1_value"] == Decimal("1080.00")


def test_a_parked_entry_reopened_by_the_queue_is_released_and_read_again(svc, world: World) -> None:
    request = world.request("investment", ACCOUNT, txn=False)
    svc.runner.run()
    assert request.uuid in world.parked()

    world.finish(request, "PROCESSING")
    svc.runner.run()
    assert world.parked() == {}

    world.portfolio_for(ACCOUNT)
    world.transaction_for("investment", ACCOUNT, request.uuid)
    world.finish(request, "CANCELLED")
    svc.runner.run()
    assert world.txn_status(request.uuid) == "CANCELLED"
    assert world.applied() == 1


def test_parked_entries_are_listed_by_the_api(client, auth, world: World) -> None:
    from service import service_of

    orphan = world.request("investment", ACCOUNT, txn=False)
    service_of(client.application).runner.run()

    answer = client.get("/api/v1/consistency/parked", headers=auth)

    assert answer.status_code == 200
    body = answer.get_json()
    assert (body["more"], body["next_after"], body["filter"]) == (False, None, {})
    (entry,) = body["entries"]
    assert entry["uuid"] == orphan.uuid
    assert entry["queue"] == "investment"
    assert entry["reason"] == f"no portfolio for account {ACCOUNT}"
    assert entry["status"] == "COMPLETED"
    assert client.get("/api/v1/consistency/status").get_json()["parked_entries"] == 1


def test_entries_without_uuid_or_account_are_parked_and_the_rest_applied(svc, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    no_uuid = world.q(
        "INSERT INTO investment_queue (account_number, uuid, status) VALUES (%s, NULL, 'COMPLETED') RETURNING queue_id",
        (ACCOUNT,),
    )[0][0]
    no_account = world.q(
        "INSERT INTO withdrawal_queue (account_number, uuid, status) VALUES (NULL, %s, 'FAILED') RETURNING queue_id",
        (world.transaction_for("withdrawal", ACCOUNT),),
    )[0][0]
    fine = world.request("investment", ACCOUNT)

    assert svc.runner.run().to_json()["result"] == "ok"

    reasons = {(q, i): r for q, i, r in world.p("SELECT queue, queue_id, reason FROM consistency.parked_entries")}
    assert reasons == {
        ("investment", no_uuid): "uuid is not a valid UUID",
        ("withdrawal", no_account): f"portfolio transaction belongs to account {ACCOUNT}",
    }
    assert world.txn_status(fine.uuid) == "PROCESSED"


def test_a_parked_entry_whose_queue_row_is_deleted_says_so(svc, world: World) -> None:
    request = world.request("investment", ACCOUNT, txn=False)
    svc.runner.run()
    world.q("DELETE FROM investment_queue WHERE queue_id = %s", (request.queue_id,))

    svc.runner.run()

    assert world.parked() == {request.uuid: "the queue entry no longer exists"}


@pytest.mark.parametrize("with_a_malformed_one", [False, True], ids=["all-castable", "one-malformed"])
def test_uuids_in_other_spellings_find_their_transactions(svc, world: World, with_a_malformed_one: bool) -> None:
    world.portfolio_for(ACCOUNT)
    spellings = {"upper": str.upper, "bare": lambda u: u.replace("-", "")}  # the queue's uuid is VARCHAR(36)
    ids = {}
    for name, spell in spellings.items():
        ids[name] = world.transaction_for("withdrawal", ACCOUNT)
        world.finish(world.enqueue("withdrawal", ACCOUNT, spell(ids[name]), txn=False), "CANCELLED")
    if with_a_malformed_one:  # the batch no longer casts as a whole, so each uuid is read on its own
        world.finish(world.enqueue("withdrawal", ACCOUNT, "{not-a-uuid}", txn=False), "CANCELLED")

    summary = svc.runner.run().to_json()

    assert summary["counts"]["withdrawal"]["CANCELLED"] == len(spellings)
    assert {name: world.txn_status(txn) for name, txn in ids.items()} == dict.fromkeys(spellings, "CANCELLED")
    assert list(world.parked().values()) == (["uuid is not a valid UUID"] if with_a_malformed_one else [])


def test_entry_by_entry_each_entry_is_applied_or_parked_once(svc, world: World) -> None:
    from apply import apply_each_entry
    from domain import INVESTMENT, Entry
    from tiers import load

    world.portfolio_for(ACCOUNT)
    orphan = world.request("investment", ACCOUNT, txn=False)
    fine = world.request("investment", ACCOUNT)
    with svc.portfolio_db.transaction() as cur:
        factors = [t.invest_factor for t in load(cur)]
        rows = world.q("SELECT queue_id, account_number, uuid, status, updated_at FROM investment_queue ORDER BY 1")
        entries = [Entry(*row) for row in rows]
        apply_each_entry(cur, INVESTMENT, entries[:1], factors, STAMP)  # parks the orphan

        counts = apply_each_entry(cur, INVESTMENT, entries, factors, STAMP, retrying=True)

    assert counts == {"parked": 1, "COMPLETED": 1}
    assert world.p("SELECT attempts FROM consistency.parked_entries") == [(2,)]
    assert world.parked() == {orphan.uuid: "no portfolio transaction with this id"}
    assert world.txn_status(fine.uuid) == "PROCESSED"
