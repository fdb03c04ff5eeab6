"""Late commits exact mode cannot see in pg_stat_activity, and queue columns without a time zone: nothing lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime

import psycopg2
import pytest

import migrations
import tiers
from config import Settings
from devkit import ROOT, postgres
from service import Service, build_service
from tests.cluster import Cluster
from tests.world import World

ACCOUNT = "1000000001"
# Past the horizon's one-second margin: the watermark may then move beyond what was settled before.
PAST_MARGIN = 1.2


@pytest.fixture(scope="module")
def own_server() -> Iterator[Cluster]:
    """A server of these tests' own, west of UTC and with two-phase commit enabled."""
    cluster = Cluster(timezone="America/New_York", max_prepared_transactions="4")
    yield cluster
    cluster.destroy()


@pytest.fixture
def make_stage(own_server: Cluster) -> Iterator:
    """Build queue-db and user-portfolio-db on the own server, the service and a World on them."""
    made: list[tuple[Service, World, list[str]]] = []

    def make(naive: bool = False, timezone: str | None = None) -> tuple[Service, World]:
        names = [postgres.unique_name("cm_own_queue"), postgres.unique_name("cm_own_portfolio")]
        for name in names:
            postgres.admin(own_server.uri, f'CREATE DATABASE "{name}"')
        queue_uri, portfolio_uri = (postgres.with_database(own_server.uri, name) for name in names)
        if timezone:
            postgres.admin(own_server.uri, f"ALTER DATABASE \"{names[0]}\" SET timezone = '{timezone}'")
        postgres.apply_schema(queue_uri, ROOT / "schema" / "queue_db.sql")
        if naive:
            with closing(psycopg2.connect(queue_uri)) as conn, conn, conn.cursor() as cur:
                for table in ("investment_queue", "withdrawal_queue"):
                    cur.execute(f"ALTER TABLE {table} ALTER COLUMN updated_at TYPE timestamp")
        postgres.apply_schema(
            portfolio_uri,
            ROOT / "schema" / "user_portfolio_db.sql",
            lambda cur: (migrations.migrate(cur), tiers.seed(cur, Settings().tier_seed)),
        )
        settings = Settings(queue_db_uri=queue_uri, portfolio_db_uri=portfolio_uri, batch_size=4)
        svc, world = build_service(settings), World(queue_uri, portfolio_uri)
        made.append((svc, world, names))
        world.portfolio_for(ACCOUNT)
        return svc, world

    yield make
    for svc, world, names in made:
        svc.close()
        world.close()
        for name in names:
            postgres.drop(own_server.uri, name)


def test_a_prepared_transaction_holds_the_watermark_until_it_commits(make_stage, caplog) -> None:
    svc, world = make_stage()
    late = world.enqueue("investment", ACCOUNT)
    writer = psycopg2.connect(world.queue_uri)
    writer.autocommit = True
    try:
        with writer.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("UPDATE investment_queue SET status = 'COMPLETED' WHERE queue_id = %s", (late.queue_id,))
            cur.execute("PREPARE TRANSACTION 'cm-late'")
        early = world.request("investment", ACCOUNT)
        time.sleep(PAST_MARGIN)

        with caplog.at_level(logging.WARNING, logger="cycle"):
            held = svc.runner.run().to_json()
        early_status = world.txn_status(early.uuid)
        with writer.cursor() as cur:
            cur.execute("COMMIT PREPARED 'cm-late'")
    finally:
        with writer.cursor() as cur:
            cur.execute("SELECT gid FROM pg_prepared_xacts WHERE gid = 'cm-late'")
            if cur.fetchone():
                cur.execute("ROLLBACK PREPARED 'cm-late'")
        writer.close()

    svc.runner.run()

    assert world.txn_status(late.uuid) == "PROCESSED"
    assert early_status == "PROCESSED"  # applied at once; only the watermark waited
    assert held["prepared_transactions"] == 1
    assert held["oldest_transaction_s"] >= 1  # at least since it was prepared: the held-watermark warning counts it
    assert any("prepared transaction" in r.getMessage() for r in caplog.records)


def test_a_session_that_hides_its_start_turns_the_cycle_to_the_look_back_rule(make_service, world, caplog) -> None:
    svc = make_service(lookback_window=5, reconcile_interval=3600)
    svc.runner.prepare()
    world.portfolio_for(ACCOUNT)
    late = world.enqueue("investment", ACCOUNT)
    writer = psycopg2.connect(world.queue_uri)
    with writer.cursor() as cur:
        cur.execute("SET track_activities = off")
        cur.execute("UPDATE investment_queue SET status = 'COMPLETED' WHERE queue_id = %s", (late.queue_id,))
    early = world.request("investment", ACCOUNT)
    time.sleep(PAST_MARGIN)

    with caplog.at_level(logging.WARNING, logger="cycle"):
        hidden = svc.runner.run().to_json()
    writer.commit()
    writer.close()
    back = svc.runner.run().to_json()

    assert world.txn_status(late.uuid) == world.txn_status(early.uuid) == "PROCESSED"
    assert (hidden["mode"], hidden["untracked_sessions"]) == ("lookback", 1)
    assert any("track_activities off" in r.getMessage() for r in caplog.records)
    # The look-back cycle kept the watermark behind the hidden commit: back in exact mode, the drain reads it.
    assert (back["mode"], back["reconciled"]) == ("exact", False)
    assert back["counts"]["investment"]["COMPLETED"] == 1


@pytest.mark.parametrize("timezone", [None, "Asia/Tokyo"], ids=["server-west-of-utc", "database-east-of-utc"])
def test_a_queue_column_without_time_zone_is_read_in_queue_dbs_time_zone(make_stage, caplog, timezone) -> None:
    svc, world = make_stage(naive=True, timezone=timezone)
    late = world.enqueue("investment", ACCOUNT)
    writer = world.finish_uncommitted(late)
    early = world.request("investment", ACCOUNT)
    time.sleep(PAST_MARGIN)

    with caplog.at_level(logging.WARNING, logger="cycle"):
        svc.runner.run()
    writer.commit()
    svc.runner.run()
    time.sleep(PAST_MARGIN)
    svc.runner.run()
    idle = svc.runner.run().to_json()

    assert world.txn_status(early.uuid) == world.txn_status(late.uuid) == "PROCESSED"
    assert idle["counts"]["investment"]["read"] == 0  # nothing read again, hours later or earlier
    shown = timezone or "America/New_York"
    assert (
        "queue-db column investment_queue.updated_at is timestamp without time zone: its values are read as local"
        f" times in queue-db's TimeZone ({shown}), the one the writers' CURRENT_TIMESTAMP follows"
    ) in [r.getMessage() for r in caplog.records]


def test_an_ambiguous_local_time_reads_as_the_later_instant(make_stage) -> None:
    """In the repeated hour of a fall-back, the service places a naive value after the change: read, never skipped.

    01:30 on 2026-11-01 in New York is 05:30 UTC (EDT) the first time and 06:30 UTC (EST) the second. With the
    watermark between the two, an entry stamped 01:30 is applied only if the service reads it as the later one.
    """
    svc, world = make_stage(naive=True)
    between = "2026-11-01 05:45+00"
    world.p("UPDATE consistency.watermarks SET updated_at = %s, queue_id = 0 WHERE queue = 'investment'", (between,))
    ambiguous = world.enqueue("investment", ACCOUNT)
    world.q(  # as a writer in the first 01:30 wrote it: the trigger runs on UPDATE only, so the stamp stays
        "DELETE FROM investment_queue WHERE queue_id = %s;"
        " INSERT INTO investment_queue (queue_id, account_number, tier_1, tier_2, tier_3, uuid, status, updated_at)"
        " VALUES (%s, %s, 10, 20, 30, %s, 'COMPLETED', '2026-11-01 01:30')",
        (ambiguous.queue_id, ambiguous.queue_id, ACCOUNT, ambiguous.uuid),
    )

    summary = svc.runner.run().to_json()

    assert summary["counts"]["investment"]["read"] == 1
    assert world.txn_status(ambiguous.uuid) == "PROCESSED"
    placed = world.p("SELECT updated_at FROM consistency.watermarks WHERE queue = 'investment'")[0][0]
    assert placed == datetime(2026, 11, 1, 6, 30, tzinfo=UTC)  # the watermark moved to the later instant
