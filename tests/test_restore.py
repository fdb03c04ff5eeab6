"""Restore from a backup: user-portfolio-db is dumped with pg_dump while entries settle and the service applies
them, more settle afterwards, and a service pointed at the dump restored into a fresh database applies again,
exactly once, everything settled after the dump. Checked against the independent model of the fault suite."""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from devkit import postgres
from devkit.net import wait_until
from devkit.postgres import pg_tool
from domain import TERMINAL
from tests.faults.harness import TIERS, check_model, open_portfolios, settled_in_queues, wait_caught_up
from tests.world import TABLES, World

ACCOUNTS = [f"30000000{n:02d}" for n in range(1, 13)]
AMOUNTS = (
    "SELECT accountid, tier1_value, tier2_value, tier3_value, total_value,"
    " tier1_allocation, tier2_allocation, tier3_allocation, total_allocation FROM user_portfolios ORDER BY accountid"
)
REQUESTS = 600  # queued, with their portfolio transactions, before the traffic starts


def queue_requests(world: World, count: int) -> list[tuple[str, int]]:
    """Queue PENDING requests spread over the accounts and both queues, each with its portfolio transaction."""
    queued = []
    for n in range(count):
        queue, account = ("investment", "withdrawal")[n % 2], ACCOUNTS[n % len(ACCOUNTS)]
        request = world.enqueue(queue, account, str(uuidlib.uuid4()))
        queued.append((queue, request.queue_id))
    return queued


class Settler(threading.Thread):
    """user-request-queue-svc: takes queued requests through PROCESSING to a final status, in random order."""

    def __init__(self, queue_uri: str, queued: list[tuple[str, int]]) -> None:
        super().__init__(daemon=True)
        self.queue_uri = queue_uri
        self.queued = queued
        self.done = 0

    def run(self) -> None:
        """Settle nine in ten of the requests, a few milliseconds apart."""
        rng = random.Random(20261202)
        order = rng.sample(self.queued, k=len(self.queued) * 9 // 10)
        conn = psycopg2.connect(self.queue_uri)
        conn.autocommit = True
        with conn.cursor() as cur:
            for queue, queue_id in order:
                status = rng.choices(TERMINAL, [6, 1, 1])[0]
                cur.execute(f"UPDATE {TABLES[queue]} SET status = 'PROCESSING' WHERE queue_id = %s", (queue_id,))
                cur.execute(
                    f"UPDATE {TABLES[queue]} SET status = %s, processed_at = now() WHERE queue_id = %s",
                    (status, queue_id),
                )
                self.done += 1
                time.sleep(0.004)
        conn.close()


@pytest.fixture
def fresh_database(pg: str) -> Iterator[str]:
    """An empty database to restore into, as a URI; dropped afterwards."""
    name = postgres.unique_name("cm_restored")
    postgres.admin(pg, f'CREATE DATABASE "{name}" TEMPLATE template0')
    yield postgres.with_database(pg, name)
    postgres.drop(pg, name)


def test_a_restored_backup_applies_everything_settled_after_it_exactly_once(
    pg: str, dbs: tuple[str, str], make_service, world: World, fresh_database: str, tmp_path: Path
) -> None:
    pg_dump, pg_restore = pg_tool(pg, "pg_dump"), pg_tool(pg, "pg_restore")
    open_portfolios(world, ACCOUNTS)
    world.set_tiers(**TIERS)
    queued = queue_requests(world, REQUESTS)
    late = world.enqueue("investment", ACCOUNTS[0])
    held = world.finish_uncommitted(late, "COMPLETED")  # a writer that commits only after the dump
    running = make_service(polling_interval=0.05, batch_size=25, listen_notify=False)
    running.start()
    settler = Settler(world.queue_uri, queued)
    settler.start()
    wait_until(lambda: settler.done >= REQUESTS // 3 and world.applied() >= REQUESTS // 6, 60, "traffic to be applied")

    dump = tmp_path / "user-portfolio-db.dump"
    subprocess.run(
        [str(pg_dump), "--format=custom", f"--file={dump}", f"--dbname={dbs[1]}"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    settled_at_dump = settler.done
    held.commit()
    settler.join(timeout=60)
    assert not settler.is_alive() and settler.done > settled_at_dump  # more settled after the dump
    wait_caught_up(world)
    running.close()
    assert check_model(world).mismatches == []  # the original database agrees with the model too
    original = world.p(AMOUNTS)

    subprocess.run(
        [str(pg_restore), "--exit-on-error", f"--dbname={fresh_database}", str(dump)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    restored = World(dbs[0], fresh_database)
    try:
        recorded_at_dump = restored.applied()
        settled = settled_in_queues(restored)
        assert 0 < recorded_at_dump < settled
        assert restored.txn_status(late.uuid) == "PENDING"
        catching_up = make_service(portfolio_db_uri=fresh_database, polling_interval=0.05, batch_size=25)
        catching_up.start()
        wait_caught_up(restored)
        catching_up.close()

        report = check_model(restored)
        assert report.mismatches == [], report.mismatches[:10]
        assert report.entries == REQUESTS + 1 and report.completed > 0 and report.accounts == len(ACCOUNTS)
        assert restored.applied() == settled and restored.parked() == {}
        once = restored.p("SELECT count(*), count(DISTINCT txn_id) FROM consistency.applied_entries")
        assert once == [(settled, settled)]  # each transaction settled once
        assert restored.p(AMOUNTS) == original  # the same amounts as the database that was never restored
        assert restored.txn_status(late.uuid) == "PROCESSED"
    finally:
        restored.close()
