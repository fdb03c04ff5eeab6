"""A row another session holds locked delays only its own account's entries, which then apply in order, once."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest

from tests.world import Request, World

HELD, CONTROL = "1000000001", "1000000002"
OTHERS = [f"20000000{n:02d}" for n in range(20)]


@pytest.fixture
def impatient(make_service):
    """A service whose statements give up on a lock at once: any wait for a held row would fail its cycle."""
    service = make_service(db_lock_timeout=0.3)
    service.runner.prepare()
    return service


@pytest.fixture
def holder(world: World) -> Iterator[psycopg2.extensions.cursor]:
    """Another session of user-portfolio-db, inside a transaction it keeps open until the test ends it."""
    conn = psycopg2.connect(world.portfolio_uri)
    with conn.cursor() as cur:
        yield cur
    conn.rollback()
    conn.close()


def open_accounts(world: World) -> None:
    """Open the held account, a control account that gets the same entries, and twenty others."""
    for account in [HELD, CONTROL, *OTHERS]:
        world.portfolio_for(account)
    world.set_tiers(TIER1_MV="1100000")  # so that every completed entry moves the amounts


def compounding_order(world: World, entries: list[Request]) -> list[int]:
    """The positions of an account's completed entries in the order the journal records them compounded."""
    rows = world.p(
        "SELECT queue_id FROM consistency.journal"
        " WHERE account_number = %s AND kind = 'applied' AND status = 'COMPLETED' ORDER BY id",
        (entries[0].account,),
    )
    positions = {r.queue_id: n for n, r in enumerate(entries)}
    return [positions[row[0]] for row in rows]


def assert_applied_like_the_control(world: World, held: list[Request], control: list[Request]) -> None:
    """The held account's entries are applied once each, in order, to the same amounts as the control's."""
    assert world.parked() == {}
    assert {world.txn_status(r.uuid) for r in held} == {world.txn_status(r.uuid) for r in control}
    assert compounding_order(world, held) == compounding_order(world, control) == sorted(compounding_order(world, held))
    assert world.amounts(HELD) == world.amounts(CONTROL)
    applied = world.p("SELECT count(*), count(DISTINCT txn_id) FROM consistency.applied_entries")
    assert applied == [(len(held) + len(control) + len(OTHERS), len(held) + len(control) + len(OTHERS))]


def test_a_held_portfolio_delays_only_its_account_and_its_entries_apply_in_order_once_it_clears(
    impatient, world: World, holder
) -> None:
    open_accounts(world)
    held = [world.request("investment", HELD), world.request("investment", HELD)]
    control = [world.request("investment", CONTROL), world.request("investment", CONTROL)]
    others = [world.request("investment", account) for account in OTHERS]
    late = world.enqueue("investment", HELD)  # its transaction first: FOR UPDATE blocks inserting one
    holder.execute("SELECT 1 FROM user_portfolios WHERE accountid = %s FOR UPDATE", (HELD,))

    before = world.amounts(HELD)
    first = impatient.runner.run()
    held.append(world.finish(late))  # settles while the lock is held
    control.append(world.request("investment", CONTROL))
    second = impatient.runner.run()

    assert (first.outcome, second.outcome) == ("ok", "ok")
    assert {world.txn_status(r.uuid) for r in others + control} == {"PROCESSED"}
    assert world.parked() == {r.uuid: f"waiting for a row lock on portfolio {HELD}" for r in held}
    assert world.amounts(HELD) == before != world.amounts(CONTROL)
    assert {world.txn_status(r.uuid) for r in held} == {"PENDING"}

    holder.connection.rollback()
    impatient.runner.run()
    assert_applied_like_the_control(world, held, control)


def test_a_held_transaction_delays_only_its_account_and_the_entries_after_it(impatient, world: World, holder) -> None:
    open_accounts(world)
    held = [world.request("withdrawal", HELD, "FAILED"), world.request("withdrawal", HELD)]
    control = [world.request("withdrawal", CONTROL, "FAILED"), world.request("withdrawal", CONTROL)]
    others = [world.request("withdrawal", account) for account in OTHERS]
    holder.execute("SELECT 1 FROM portfolio_transactions WHERE id = %s FOR NO KEY UPDATE", (held[0].uuid,))

    before = world.amounts(HELD)
    first = impatient.runner.run()
    held.append(world.request("withdrawal", HELD))  # behind the parked ones, in a batch of its own
    control.append(world.request("withdrawal", CONTROL))
    second = impatient.runner.run()

    assert (first.outcome, second.outcome) == ("ok", "ok")
    assert {world.txn_status(r.uuid) for r in others} == {"PROCESSED"}
    behind = f"waiting for a row lock: behind an earlier entry of account {HELD}"
    assert world.parked() == {
        held[0].uuid: f"waiting for a row lock on portfolio transaction {held[0].uuid}",
        held[1].uuid: behind,
        held[2].uuid: behind,
    }
    assert world.amounts(HELD) == before != world.amounts(CONTROL)  # not compounded yet

    holder.connection.rollback()
    impatient.runner.run()
    assert_applied_like_the_control(world, held, control)


def test_a_portfolio_held_as_a_foreign_key_insert_holds_it_is_not_waited_for(impatient, world: World, holder) -> None:
    open_accounts(world)
    request = world.request("investment", HELD)
    # What the portfolio service's insert of a transaction for this account takes on its portfolio.
    holder.execute("SELECT 1 FROM user_portfolios WHERE accountid = %s FOR KEY SHARE", (HELD,))

    assert impatient.runner.run().outcome == "ok"
    assert world.parked() == {}
    assert world.txn_status(request.uuid) == "PROCESSED"
