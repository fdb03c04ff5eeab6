"""The pool wrapper: broken connections are discarded, driver errors become DatabaseError without credentials."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from db import Database, DatabaseError
from domain import Entry
from logs import mask_uri
from tests.world import (
    STAMP,
    World,
)


def backend_pid(db: Database) -> int:
    """Return the server process behind the connection the pool lends next."""
    with db.transaction() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def test_a_broken_pooled_connection_is_discarded_and_the_next_call_reconnects(settings, world: World) -> None:
    db = Database("user-portfolio-db", settings.portfolio_db_uri, settings)
    try:
        pid = backend_pid(db)
        world.p("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # waits until it is gone

        with pytest.raises(DatabaseError) as failed:
            backend_pid(db)
        assert failed.value.database == "user-portfolio-db"
        assert backend_pid(db) != pid
    finally:
        db.close()


def test_errors_and_uris_never_show_a_password(settings) -> None:
    uri = "postgresql://svc:pw-0123-secret@127.0.0.1:1/queue-db"
    db = Database("queue-db", uri, replace(settings, db_connect_timeout=1))
    with pytest.raises(DatabaseError) as failed:
        backend_pid(db)
    assert "pw-0123-secret" not in str(failed.value)
    assert mask_uri(uri) == "postgresql://svc:***@127.0.0.1:1/queue-db"
    assert db.redact(f"could not use {uri} with pw-0123-secret") == (
        "could not use postgresql://svc:***@127.0.0.1:1/queue-db with ***"
    )
    db.close()


def test_a_busy_pool_waits_then_says_so(settings) -> None:
    db = Database("queue-db", settings.queue_db_uri, replace(settings, db_pool_size=2, db_connect_timeout=1))
    try:
        with db.connection(), db.connection(), pytest.raises(DatabaseError, match="no free connection within 1s"):
            backend_pid(db)
        assert backend_pid(db) > 0
    finally:
        db.close()


def test_array_literals_round_trip_any_text(world: World) -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    from db import pg_array

    nasty = ["plain", "", "NULL", None, "a,b", "{x}", 'say "hi"', "back\\slash", " padded ", "it's", "ü€"]
    assert world.p("SELECT %s::text[]", (pg_array(nasty),))[0][0] == nasty
    amounts = [Decimal("1E+6"), Decimal("-0.01"), Decimal("12345678901.23")]
    assert world.p("SELECT %s::numeric[]", (pg_array(amounts),))[0][0] == amounts
    moments = [datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)]
    assert world.p("SELECT %s::timestamptz[]", (pg_array(moments),))[0][0] == moments
    assert world.p("SELECT %s::integer[]", (pg_array([]),))[0][0] == []
    assert world.p("SELECT %s::integer[]", (pg_array([1, -2, 2**31 - 1]),))[0][0] == [1, -2, 2**31 - 1]


def test_every_connection_carries_the_configured_timeouts(settings) -> None:
    timed = replace(settings, db_statement_timeout=0.5, db_lock_timeout=0.25, cycle_lease=6.0)
    db = Database("queue-db", settings.queue_db_uri, timed)
    try:
        with db.transaction() as cur:
            cur.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
                        " current_setting('idle_in_transaction_session_timeout'), current_setting('jit')")  # fmt: skip
            assert cur.fetchone() == ("500ms", "250ms", "3s", "off")  # half the cycle lease; no JIT
            assert cur.connection.info.dsn_parameters["connect_timeout"] == str(settings.db_connect_timeout)
        with pytest.raises(DatabaseError, match="statement timeout"), db.transaction() as cur:
            cur.execute("SELECT pg_sleep(2)")
    finally:
        db.close()


def test_the_portfolio_lock_lets_other_services_insert_transactions(settings, world: World) -> None:
    from apply import apply_each_entry
    from domain import INVESTMENT
    from tiers import load

    world.portfolio_for("1000000001")
    request = world.request("investment", "1000000001")
    (entry,) = world.q("SELECT queue_id, account_number, uuid, status, updated_at FROM investment_queue")
    db = Database("user-portfolio-db", settings.portfolio_db_uri, settings)
    try:
        with db.transaction() as cur:
            factors = [t.invest_factor for t in load(cur)]
            assert apply_each_entry(cur, INVESTMENT, [Entry(*entry)], factors, STAMP) == {"COMPLETED": 1}
            # The portfolio service's foreign-key insert must not wait for the cycle's row lock.
            world.p("SET lock_timeout = '1s'")
            world.transaction_for("investment", "1000000001")
    finally:
        db.close()
    assert world.txn_status(request.uuid) == "PROCESSED"


def pooled_pids(db: Database) -> list[int]:
    """Return the server processes behind the connections the pool keeps, without lending them."""
    return sorted(conn.info.backend_pid for conn in db._pool._pool)


@pytest.mark.parametrize("failing", ["queue-db", "user-portfolio-db"])
def test_a_lost_connection_is_named_by_its_own_database_and_only_it_is_discarded(
    svc, world: World, caplog, failing
) -> None:
    assert svc.runner.run().to_json()["result"] == "ok"
    dbs = {"queue-db": svc.queue_db, "user-portfolio-db": svc.portfolio_db}
    healthy = next(db for name, db in dbs.items() if name != failing)
    kept = pooled_pids(healthy)
    for pid in pooled_pids(dbs[failing]):
        world.p("SELECT pg_terminate_backend(%s, 5000)", (pid,))

    with caplog.at_level(logging.ERROR, logger="cycle"):
        summary = svc.poller.run_once().to_json()

    assert summary["result"] == "error"
    assert summary["error"].startswith(f"{failing}: ")
    assert svc.status()["this_process"]["last_attempt"]["error"] == summary["error"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"consistency cycle failed in {summary['duration_ms']:g} ms; error: {summary['error']}"
    ]
    assert pooled_pids(healthy) == kept  # the healthy database's connections stay in the pool
    assert svc.runner.run().to_json()["result"] == "ok"


def test_a_lock_timeout_on_user_portfolio_db_is_named_so(make_service, world: World) -> None:
    svc = make_service(db_lock_timeout=0.3)
    svc.runner.prepare()
    world.portfolio_for("1000000001")
    world.request("investment", "1000000001")
    with world.portfolio.cursor() as cur:
        cur.execute("BEGIN")
        # A held row of the service's own state: the cycle waits for it, where it skips held portfolio rows.
        cur.execute("SELECT 1 FROM consistency.watermarks WHERE queue = 'investment' FOR UPDATE")
        summary = svc.runner.run().to_json()
        kept = pooled_pids(svc.queue_db)
        cur.execute("ROLLBACK")

    assert summary["result"] == "error"
    assert summary["error"] == "user-portfolio-db: canceling statement due to lock timeout"
    assert len(kept) == 1  # the queue-db connection went back to the pool
