"""The fault-injection harness: real service processes, writers like the other services, and the model check."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import psycopg2

from tests.pgtest import ROOT, free_port
from tests.world import TABLES, TYPES, World, expected

API_TOKEN = "fault-token-0123456789abcdef"
# Deltas that make every application visible: a doubled or missing one changes the portfolio.
TIERS = {
    "TIER1": "1000000",
    "TIER1_MV": "1100000",
    "TIER2": "2000000",
    "TIER2_MV": "1950000",
    "TIER3": "500000",
    "TIER3_MV": "525000",
}
START_VALUES = ("1000.00", "2000.00", "3000.00")
START_ALLOCATIONS = ("100.00", "200.00", "300.00")
MIRRORED = {"COMPLETED": "PROCESSED", "FAILED": "FAILED", "CANCELLED": "CANCELLED"}
TERMINAL = tuple(MIRRORED)


def service_env(queue_uri: str, portfolio_uri: str, **extra: str) -> dict[str, str]:
    """The environment of one replica."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIER", "POLLING", "PORT", "BATCH", "DB_"))}
    env.update(
        QUEUE_DB_URI=queue_uri,
        USER_PORTFOLIO_DB_URI=portfolio_uri,
        API_TOKEN=API_TOKEN,
        POLLING_INTERVAL="0.2",
        BATCH_SIZE="50",
        PORT=str(free_port()),
        **TIERS,
    )
    env.update(extra)
    return env


class Replica:
    """One deployment of the service: a gunicorn process group with its own port and log."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 2) -> None:
        self.env = env
        self.log = log
        self.workers = workers
        self.port = int(env["PORT"])
        self.process: subprocess.Popen | None = None

    def start(self) -> Replica:
        """Start gunicorn in a process group of its own."""
        command = [sys.executable, "-m", "gunicorn", "consistency_manager_svc:app", "--workers", str(self.workers)]
        out = self.log.open("a")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        return self

    def get(self, path: str, method: str = "GET") -> tuple[int, dict]:
        """Call the API; return the status and JSON answer."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        request.add_header("Authorization", f"Bearer {API_TOKEN}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback only
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until /ready answers 200."""
        wait_until(lambda: self.get("/ready")[0] == 200, timeout, f"replica on port {self.port} to be ready")

    def kill_group(self) -> None:
        """SIGKILL the master and every worker at once, as a crash or an OOM kill would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def kill_master(self) -> None:
        """SIGKILL only the gunicorn master; its workers notice and exit on their own."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM the master and return its exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def cleanup(self) -> None:
        """Make sure nothing of this replica is left running."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def wait_until(check, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll until check() is true; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, psycopg2.Error):
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Writers:
    """Threads acting as user-request-queue-svc and the portfolio service: queue requests and settle them."""

    def __init__(self, world: World, accounts: list[str], threads: int = 2, pause: float = 0.002) -> None:
        self.queue_uri = world.queue_uri
        self.portfolio_uri = world.portfolio_uri
        self.accounts = accounts
        self.pause = pause
        self.stopping = threading.Event()
        self.settled = Counter()
        self.errors = 0
        self._threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(threads)]

    def start(self) -> Writers:
        """Start writing."""
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop writing and wait for the threads."""
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, seed: int) -> None:
        """Write until stopped, riding out database outages."""
        rng = random.Random(seed)
        while not self.stopping.is_set():
            try:
                queue_db = psycopg2.connect(self.queue_uri, connect_timeout=3)
                portfolio_db = psycopg2.connect(self.portfolio_uri, connect_timeout=3)
                queue_db.autocommit = portfolio_db.autocommit = True
                while not self.stopping.is_set():
                    self._one_request(rng, queue_db, portfolio_db)
                    time.sleep(self.pause)
            except psycopg2.Error:
                self.errors += 1
                time.sleep(0.2)

    def _one_request(self, rng: random.Random, queue_db, portfolio_db) -> None:
        """Queue one request and take it through PROCESSING to a final status (or leave it pending)."""
        queue = rng.choice(("investment", "withdrawal"))
        account = rng.choice(self.accounts)
        entry = str(uuidlib.uuid4())
        with portfolio_db.cursor() as cur:
            cur.execute(
                "INSERT INTO portfolio_transactions (id, accountid, transaction_type, total_amount)"
                " VALUES (%s, %s, %s, 100)",
                (entry, account, TYPES[queue]),
            )
        with queue_db.cursor() as cur:
            cur.execute(
                f"INSERT INTO {TABLES[queue]} (account_number, tier_1, tier_2, tier_3, uuid)"
                " VALUES (%s, 10, 20, 30, %s) RETURNING queue_id",
                (account, entry),
            )
            queue_id = cur.fetchone()[0]
            status = rng.choices(["COMPLETED", "FAILED", "CANCELLED", "PENDING"], [14, 2, 2, 2])[0]
            if status == "PENDING":
                return
            cur.execute(f"UPDATE {TABLES[queue]} SET status = 'PROCESSING' WHERE queue_id = %s", (queue_id,))
            cur.execute(
                f"UPDATE {TABLES[queue]} SET status = %s, processed_at = now() WHERE queue_id = %s",
                (status, queue_id),
            )
        self.settled[status] += 1


def bulk_backlog(world: World, accounts: list[str], count: int) -> None:
    """Queue `count` requests already settled, in one go: a backlog that takes the service a while."""
    for queue in ("investment", "withdrawal"):
        world.p(
            "INSERT INTO portfolio_transactions (id, accountid, transaction_type, total_amount)"
            " SELECT md5(%s || n)::uuid, (%s::text[])[1 + n %% %s], %s, 100 FROM generate_series(1, %s) AS n",
            (queue, accounts, len(accounts), TYPES[queue], count // 2),
        )
        world.q(
            f"INSERT INTO {TABLES[queue]} (account_number, uuid, status, processed_at)"
            " SELECT (%s::text[])[1 + n %% %s], md5(%s || n)::uuid::text,"
            " (ARRAY['COMPLETED','COMPLETED','COMPLETED','COMPLETED','FAILED','CANCELLED'])[1 + n %% 6], now()"
            " FROM generate_series(1, %s) AS n",
            (accounts, len(accounts), queue, count // 2),
        )


def open_portfolios(world: World, accounts: list[str]) -> None:
    """Open a portfolio for each account with the harness's starting amounts."""
    for account in accounts:
        world.portfolio_for(account, START_VALUES, START_ALLOCATIONS)


def settled_in_queues(world: World) -> int:
    """Count the queue entries in a terminal status."""
    return sum(
        world.q(f"SELECT count(*) FROM {table} WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')")[0][0]
        for table in TABLES.values()
    )


def wait_caught_up(world: World, timeout: float = 60) -> None:
    """Wait until every terminal entry has been applied or parked."""

    def done() -> bool:
        handled = world.applied() + world.p("SELECT count(*) FROM consistency.parked_entries")[0][0]
        return handled == settled_in_queues(world)

    wait_until(done, timeout, "every terminal entry to be applied or parked", interval=0.3)


@dataclass
class Report:
    """What the model check compared, and every difference it found."""

    entries: int = 0
    completed: int = 0
    accounts: int = 0
    mismatches: list[str] = field(default_factory=list)


def check_model(world: World) -> Report:
    """Compare user-portfolio-db with a model computed independently from the final queue state."""
    report = Report()
    txns = dict(world.p("SELECT id::text, status FROM portfolio_transactions"))
    starts = {row[0] for row in world.p("SELECT accountid FROM user_portfolios")}
    applied = {(q, i) for q, i in world.p("SELECT queue, queue_id FROM consistency.applied_entries")}
    parked = {(q, i) for q, i in world.p("SELECT queue, queue_id FROM consistency.parked_entries")}
    completed: Counter[tuple[str, str]] = Counter()
    for queue, table in TABLES.items():
        for queue_id, entry, account, status in world.q(f"SELECT queue_id, uuid, account_number, status FROM {table}"):
            report.entries += 1
            key = (queue, queue_id)
            applicable = account in starts and entry in txns
            if status not in TERMINAL:
                if key in applied or (entry in txns and txns[entry] != "PENDING"):
                    report.mismatches.append(f"{key} is {status} but was applied")
            elif not applicable:
                if key not in parked:
                    report.mismatches.append(f"{key} cannot apply but is not parked")
            else:
                if key not in applied:
                    report.mismatches.append(f"{key} is {status} but was not applied")
                if txns[entry] != MIRRORED[status]:
                    report.mismatches.append(f"{key}: transaction is {txns[entry]}, expected {MIRRORED[status]}")
                if status == "COMPLETED":
                    completed[(queue, account)] += 1
    report.completed = sum(completed.values())
    for account in starts:
        report.accounts += 1
        _compare_account(world, account, completed, report)
    return report


def _compare_account(world: World, account: str, completed: Counter, report: Report) -> None:
    """Compare one portfolio with the compounding of its completed entries."""
    got = world.amounts(account)
    invests, withdraws = completed[("investment", account)], completed[("withdrawal", account)]
    for n, (value, allocation) in enumerate(zip(START_VALUES, START_ALLOCATIONS, strict=True), start=1):
        pool, market = TIERS[f"TIER{n}"], TIERS[f"TIER{n}_MV"]
        want_value = expected(value, *[(market, pool)] * invests)
        want_allocation = expected(allocation, *[(str(2 * int(pool) - int(market)), pool)] * withdraws)
        if got[f"tier{n}_value"] != want_value:
            report.mismatches.append(f"{account} tier{n}_value {got[f'tier{n}_value']} != {want_value}")
        if got[f"tier{n}_allocation"] != want_allocation:
            report.mismatches.append(f"{account} tier{n}_allocation {got[f'tier{n}_allocation']} != {want_allocation}")
    for kind in ("value", "allocation"):
        total = sum((got[f"tier{n}_{kind}"] for n in (1, 2, 3)), Decimal(0))
        if got[f"total_{kind}"] != total:
            report.mismatches.append(f"{account} total_{kind} {got[f'total_{kind}']} != {total}")
