"""The fault-injection harness: real service processes, writers like the other services, and the model check."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
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

from devkit import gunicorn
from devkit.net import free_port, wait_until
from domain import MIRRORED, TERMINAL
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
        """Start gunicorn in a process group of its own, logging to the replica's file."""
        command = gunicorn.command("--workers", str(self.workers))
        self.process = gunicorn.start(command, self.env, self.log, own_group=True)
        return self

    def get(self, path: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
        """Call the API, with a JSON body if given; return the status and JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {API_TOKEN}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
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
        return gunicorn.stop(self.process, timeout)

    def cleanup(self) -> None:
        """Make sure nothing of this replica is left running."""
        if self.process is not None:
            gunicorn.kill(self.process)
            self.process.wait(timeout=10)


class Operator:
    """An operator acting through one replica's API, in a thread: pauses, resumes and starts drift checks."""

    def __init__(self, replica: Replica, seed: int = 7) -> None:
        self.replica = replica
        self.rng = random.Random(seed)
        self.actions: Counter[str] = Counter()
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Operator:
        """Start acting."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop acting, and leave applying resumed."""
        self.stopping.set()
        self._thread.join(timeout=30)
        self.replica.get("/api/v1/consistency/resume", "POST", {"reason": "the storm is over"})

    def _run(self) -> None:
        """Now and then pause for a moment and resume, and start a drift check, until stopped."""
        while not self.stopping.wait(self.rng.uniform(0.8, 1.6)):
            self._act("pause")
            time.sleep(self.rng.uniform(0.1, 0.4))
            self._act("resume")
            if self.rng.random() < 0.5:
                self._act("drift-checks")

    def _act(self, action: str) -> None:
        """Take one action through the API and count its answer."""
        status, _ = self.replica.get(f"/api/v1/consistency/{action}", "POST", {"reason": "fault storm"})
        self.actions[f"{action} {status}"] += 1


def final_drift_check(replica: Replica, timeout: float = 120) -> dict:
    """Start a drift check once the one running (if any) is done, wait for it, and return its report."""
    started: dict = {}

    def start() -> bool:
        status, answer = replica.get("/api/v1/consistency/drift-checks", "POST", {"reason": "the final check"})
        started.update(answer if status == 202 else {})
        return status == 202

    wait_until(start, timeout, "a drift check to start")

    def finished() -> bool:
        status, report = replica.get("/api/v1/consistency/drift-checks/latest")
        return status == 200 and report["id"] == started["id"] and report["state"] != "running"

    wait_until(finished, timeout, "the final drift check to finish")
    return replica.get("/api/v1/consistency/drift-checks/latest")[1]


class Writers:
    """Threads acting as user-request-queue-svc and the portfolio service: queue requests and settle them."""

    def __init__(
        self, world: World, accounts: list[str], threads: int = 2, pause: float = 0.002, duplicates: float = 0.0
    ) -> None:
        self.queue_uri = world.queue_uri
        self.portfolio_uri = world.portfolio_uri
        self.accounts = accounts
        self.pause = pause
        # The share of settled requests that a second queue row names again: another spelling or a re-queue.
        self.duplicates = duplicates
        self.respelled = 0
        self.requeued = 0
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
            if rng.random() < self.duplicates:
                self._name_again(rng, cur, queue, account, entry, queue_id, status)

    def _name_again(self, rng: random.Random, cur, queue: str, account: str, entry: str, queue_id: int, status: str):
        """Queue a settled transaction again: in another spelling with any outcome, or re-queued as it was.

        A second spelling comes after the first, which settles the transaction. A re-queue deletes the first
        row, which the service may or may not have read, so it keeps the first row's outcome.
        """
        table = TABLES[queue]
        if rng.random() < 0.5:
            spelled, outcome = rng.choice([entry.upper(), entry.replace("-", "")]), rng.choice(TERMINAL)
            self.respelled += 1
        else:
            cur.execute(f"DELETE FROM {table} WHERE queue_id = %s", (queue_id,))
            spelled, outcome = entry, status
            self.requeued += 1
        cur.execute(
            f"INSERT INTO {table} (account_number, tier_1, tier_2, tier_3, uuid) VALUES (%s, 10, 20, 30, %s)"
            " RETURNING queue_id",
            (account, spelled),
        )
        again = cur.fetchone()[0]
        cur.execute(f"UPDATE {table} SET status = %s, processed_at = now() WHERE queue_id = %s", (outcome, again))


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
    return len(_settled_keys(world))


def _settled_keys(world: World) -> set[tuple[str, int]]:
    """The (queue, queue_id) of every queue entry in a terminal status."""
    return {
        (queue, queue_id)
        for queue, table in TABLES.items()
        for (queue_id,) in world.q(f"SELECT queue_id FROM {table} WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')")
    }


def wait_caught_up(world: World, timeout: float = 60) -> None:
    """Wait until every terminal entry has been applied or parked."""

    def done() -> bool:
        handled = set(world.p("SELECT queue, queue_id FROM consistency.applied_entries"))
        handled |= set(world.p("SELECT queue, queue_id FROM consistency.parked_entries"))
        return _settled_keys(world) <= handled

    wait_until(done, timeout, "every terminal entry to be applied or parked", interval=0.3)


@dataclass
class Report:
    """What the model check compared, and every difference it found."""

    entries: int = 0
    completed: int = 0
    accounts: int = 0
    mismatches: list[str] = field(default_factory=list)


def same_transaction(text: str | None) -> str | None:
    """Return the portfolio transaction a queue uuid names, in one spelling, or the text when it is not a UUID."""
    try:
        return str(uuidlib.UUID(text)) if text else text
    except ValueError:
        return text


def check_model(world: World) -> Report:
    """Compare user-portfolio-db with a model computed independently from the final queue state.

    Money moves per portfolio transaction: of the terminal rows that name one, the first in
    (updated_at, queue_id) order settles it, exactly once, and every other is parked.
    """
    report = Report()
    txns = dict(world.p("SELECT id::text, status FROM portfolio_transactions"))
    starts = {row[0] for row in world.p("SELECT accountid FROM user_portfolios")}
    applied = {(q, i) for q, i in world.p("SELECT queue, queue_id FROM consistency.applied_entries")}
    records = Counter(t for (t,) in world.p("SELECT txn_id::text FROM consistency.applied_entries") if t)
    parked = {(q, i) for q, i in world.p("SELECT queue, queue_id FROM consistency.parked_entries")}
    groups: dict[tuple[str, str | None], list[tuple]] = {}
    for queue, table in TABLES.items():
        for row in world.q(f"SELECT queue_id, uuid, account_number, status, updated_at FROM {table}"):
            report.entries += 1
            groups.setdefault((queue, same_transaction(row[1])), []).append(row)
    completed: Counter[tuple[str, str]] = Counter()
    for (queue, txn), rows in groups.items():
        _check_transaction(queue, txn, rows, txns, starts, applied, records, parked, completed, report)
    report.completed = sum(completed.values())
    for account in starts:
        report.accounts += 1
        _compare_account(world, account, completed, report)
    _check_journal(world, applied, report)
    return report


def _check_journal(world: World, applied: set[tuple[str, int]], report: Report) -> None:
    """Each ledger record has exactly one journal record of its application, and each portfolio's last
    completed record ends at the amounts the portfolio holds."""
    told = Counter(
        (q, i)
        for q, i in world.p("SELECT queue, queue_id FROM consistency.journal WHERE kind IN ('applied', 'adopted')")
    )
    for key in applied | set(told):
        if told[key] != (key in applied):
            report.mismatches.append(
                f"{key} has {told[key]} journal records of its application, ledger: {key in applied}"
            )
    last = world.p(
        "SELECT DISTINCT ON (account_number, queue) account_number, queue,"
        " ARRAY[tier1_after, tier2_after, tier3_after] FROM consistency.journal"
        " WHERE kind = 'applied' AND tier1_after IS NOT NULL ORDER BY account_number, queue, id DESC"
    )
    for account, queue, after in last:
        columns = "value" if queue == "investment" else "allocation"
        held = world.amounts(account)
        if after != [held[f"tier{n}_{columns}"] for n in (1, 2, 3)]:
            report.mismatches.append(
                f"{account}: the journal's last {queue} ends at {after}, the portfolio holds {held}"
            )


def _check_transaction(queue, txn, rows, txns, starts, applied, records, parked, completed, report) -> None:
    """Check the queue rows that name one portfolio transaction against what the service recorded."""
    for queue_id, _, _, status, _ in rows:
        if status not in TERMINAL and (queue, queue_id) in applied:
            report.mismatches.append(f"{(queue, queue_id)} is {status} but was applied")
    settled = sorted((r for r in rows if r[3] in TERMINAL), key=lambda r: (r[4], r[0]))
    if not settled:
        if txn in txns and txns[txn] != "PENDING":
            report.mismatches.append(f"transaction {txn} is {txns[txn]} but no entry for it settled")
        return
    first_id, _, account, status, _ = settled[0]
    if account not in starts or txn not in txns:
        unparked = [r[0] for r in settled if (queue, r[0]) not in parked]
        report.mismatches += [f"{(queue, queue_id)} cannot apply but is not parked" for queue_id in unparked]
        return
    if records[txn] != 1:
        report.mismatches.append(f"transaction {txn} has {records[txn]} applied records")
    if txns[txn] != MIRRORED[status]:
        report.mismatches.append(f"{(queue, first_id)}: transaction is {txns[txn]}, expected {MIRRORED[status]}")
    for queue_id, *_ in settled:
        if (queue, queue_id) not in applied and (queue, queue_id) not in parked:
            report.mismatches.append(f"{(queue, queue_id)} is neither applied nor parked")
    if status == "COMPLETED":
        completed[(queue, account)] += 1


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
