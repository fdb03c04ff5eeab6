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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg2

from devkit import gunicorn
from devkit.net import free_port, wait_until
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
# The model's own copy of the documented rules (docs/concepts/), not domain.py's: a wrong mapping there must not
# agree with itself.
# The status each settled queue status gives the portfolio transaction; every other status settles nothing.
MIRROR = {"COMPLETED": "PROCESSED", "FAILED": "FAILED", "CANCELLED": "CANCELLED"}
SETTLED = tuple(MIRROR)
# What each API action of the operator may answer; anything else (a 5xx above all) fails the scenario.
ANSWERS = {"pause": {200}, "resume": {200}, "drift-checks": {202, 409}, "update-tier-values": {200}}


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


@dataclass(frozen=True)
class TierUpdate:
    """One tier value update the harness sent through the API: the six values it set, and the answer."""

    values: dict[str, Decimal]
    status: int
    answer: dict


class Operator:
    """An operator acting through one replica's API, in a thread: pauses, resumes, starts drift checks and changes
    the tier values, keeping its own record of every update it sent."""

    def __init__(self, replica: Replica, seed: int = 7) -> None:
        self.replica = replica
        self.rng = random.Random(seed)
        self.actions: Counter[str] = Counter()
        self.failures: list[str] = []  # calls that got no answer at all
        self.tier_updates: list[TierUpdate] = []
        self._tiers = {key: Decimal(value) for key, value in TIERS.items()}
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
        self._act("resume", {"reason": "the storm is over"}, {200, 409})

    def unexpected(self) -> list[str]:
        """The answers no action should get (a 5xx above all), and the calls that got none."""
        wrong = [f"{a} {n}x" for a, n in self.actions.items() if int(a.split()[1]) not in ANSWERS[a.split()[0]]]
        return wrong + self.failures

    def _run(self) -> None:
        """Now and then change the tier values, pause for a moment and resume, and start a drift check."""
        while not self.stopping.wait(self.rng.uniform(0.8, 1.6)):
            self._update_tiers()
            self._act("pause", {"reason": "fault storm"})
            time.sleep(self.rng.uniform(0.1, 0.4))
            self._act("resume", {"reason": "fault storm"})
            if self.rng.random() < 0.5:
                self._act("drift-checks", {"reason": "fault storm"})

    def _update_tiers(self) -> None:
        """Set all six tier values anew, every tier to another pool and market, and record what was sent and
        answered."""
        values = dict(self._tiers)
        for n in (1, 2, 3):
            while (values[f"TIER{n}"], values[f"TIER{n}_MV"]) == (self._tiers[f"TIER{n}"], self._tiers[f"TIER{n}_MV"]):
                pool = Decimal(self.rng.randrange(50_000_000, 300_000_000)) / 100
                # A market within 1% to 6% of the pool, either way, to 8 places: each entry's step shows.
                move = self.rng.choice((-1, 1)) * self.rng.randrange(100, 600)
                values[f"TIER{n}"] = pool
                values[f"TIER{n}_MV"] = (pool * (10_000 + move) / 10_000).quantize(Decimal("1e-8"))
        body = {key: str(value) for key, value in values.items()}
        status, answer = self._act("update-tier-values", {**body, "reason": "fault storm"})
        self.tier_updates.append(TierUpdate(values, status, answer))
        if status == 200:
            self._tiers = values

    def _act(self, action: str, body: dict, allowed: set[int] | None = None) -> tuple[int, dict]:
        """Take one action through the API and count its answer, unless it is one of `allowed`."""
        try:
            status, answer = self.replica.get(f"/api/v1/consistency/{action}", "POST", body)
        except (OSError, ValueError) as err:  # no answer, or one that is not JSON
            self.failures.append(f"{action}: {err!r}")
            return 0, {}
        if allowed is None or status not in allowed:
            self.actions[f"{action} {status}"] += 1
        return status, answer


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
        self.settled: Counter[str] = Counter()
        self.failures: list[str] = []  # every database error a writer met; only an outage should cause any
        self._threads = [
            threading.Thread(target=self._run, args=(seed, accounts[seed::threads] or accounts), daemon=True)
            for seed in range(threads)
        ]

    @property
    def errors(self) -> int:
        """How many database errors the writers met."""
        return len(self.failures)

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

    def _run(self, seed: int, accounts: list[str]) -> None:
        """Write for accounts of this thread's own until stopped, riding out database outages.

        One thread per account: an account's entries then commit in the order of their updated_at, the order the
        service applies them in and the model replays them in.
        """
        rng = random.Random(seed)
        while not self.stopping.is_set():
            try:
                queue_db = psycopg2.connect(self.queue_uri, connect_timeout=3)
                portfolio_db = psycopg2.connect(self.portfolio_uri, connect_timeout=3)
                queue_db.autocommit = portfolio_db.autocommit = True
                while not self.stopping.is_set():
                    self._one_request(rng, accounts, queue_db, portfolio_db)
                    time.sleep(self.pause)
            except psycopg2.Error as err:
                self.failures.append(f"{type(err).__name__}: {str(err).strip()[:200]}")
                time.sleep(0.2)

    def _one_request(self, rng: random.Random, accounts: list[str], queue_db, portfolio_db) -> None:
        """Queue one request and take it through PROCESSING to a final status (or leave it pending)."""
        queue = rng.choice(("investment", "withdrawal"))
        account = rng.choice(accounts)
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
            spelled, outcome = rng.choice([entry.upper(), entry.replace("-", "")]), rng.choice(SETTLED)
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


# A queue row as the model reads it: the same shape as the `lost` rows check_model takes.
ROW_COLUMNS = "queue_id, uuid, account_number, status, updated_at"


def _settled_keys(world: World) -> set[tuple[str, int, str | None]]:
    """Every queue entry in a terminal status, as (queue, queue_id, transaction): what identifies an entry."""
    return {
        (queue, queue_id, same_transaction(uuid))
        for queue, table in TABLES.items()
        for queue_id, uuid in world.q(
            f"SELECT queue_id, uuid FROM {table} WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')"
        )
    }


def _handled_keys(world: World) -> set[tuple[str, int, str | None]]:
    """Every entry the ledger records or the parked list holds, as (queue, queue_id, transaction)."""
    handled = set(world.p("SELECT queue, queue_id, txn_id::text FROM consistency.applied_entries"))
    parked = world.p("SELECT queue, queue_id, uuid FROM consistency.parked_entries")
    return handled | {(queue, queue_id, same_transaction(uuid)) for queue, queue_id, uuid in parked}


def wait_caught_up(world: World, timeout: float = 60) -> None:
    """Wait until every terminal entry, under the transaction its row carries now, has been applied or parked."""
    wait_until(
        lambda: _settled_keys(world) <= _handled_keys(world),
        timeout,
        "every terminal entry to be applied or parked",
        interval=0.3,
    )


@dataclass
class Report:
    """What the model check compared, and every difference it found."""

    entries: int = 0
    settled: int = 0
    completed: int = 0
    accounts: int = 0
    tier_versions: int = 0
    mismatches: list[str] = field(default_factory=list)


def same_transaction(text: str | None) -> str | None:
    """Return the portfolio transaction a queue uuid names, in one spelling, or the text when it is not a UUID."""
    try:
        return str(uuidlib.UUID(text)) if text else text
    except ValueError:
        return text


@dataclass(frozen=True)
class Row:
    """One queue row: in queue-db now, or lost from it (in a restore) after it settled."""

    queue: str
    queue_id: int
    uuid: str | None
    account: str | None
    status: str | None
    updated_at: datetime
    lost: bool = False

    @property
    def txn(self) -> str | None:
        """The portfolio transaction the row names."""
        return same_transaction(self.uuid)

    @property
    def key(self) -> tuple[str, int, str | None]:
        """What identifies the entry: its queue, queue_id and transaction."""
        return (self.queue, self.queue_id, self.txn)


@dataclass(frozen=True)
class Record:
    """A ledger record (consistency.applied_entries), with the journal record written in its transaction."""

    queue: str
    queue_id: int
    txn: str | None
    status: str
    applied_at: datetime
    kind: str | None = None  # of the journal record: 'applied', 'adopted', or None when there is none
    tier_version: int | None = None
    cycle: int | None = None


@dataclass
class Stored:
    """What user-portfolio-db holds, as the model reads it."""

    txns: dict[str, tuple[str, str, str]]  # id: status, account, type
    portfolios: set[str]
    records: dict[str | None, list[Record]]  # by transaction
    parked: set[tuple[str, int, str | None]]


@dataclass(frozen=True)
class Version:
    """The tier values a tier_value_history id names, as the harness sent them, and when they were stored."""

    values: dict[str, Decimal]
    changed_at: datetime


def check_model(
    world: World, lost: Sequence[tuple[str, tuple]] = (), tier_updates: Sequence[TierUpdate] | None = None
) -> Report:
    """Compare user-portfolio-db with a model computed independently from the queue rows and the harness's record.

    An entry is a queue row's queue, queue_id and transaction. Money moves per portfolio transaction: of the
    terminal rows that name one, the first in (updated_at, queue_id) order settles it, exactly once, and every
    other is parked. `lost` gives rows, as (queue, (queue_id, uuid, account_number, status, updated_at)), that
    settled but are gone from queue-db: what the ledger records of them counts. Each completed entry compounds
    with the tier values its journal record names: the seed (TIERS), or one of `tier_updates`, the updates the
    harness sent; without them, the tier values stayed TIERS throughout.
    """
    report = Report()
    stored = _read_stored(world)
    rows = _queue_rows(world, lost)
    report.entries = len(rows)
    versions = _tier_versions(world, tier_updates, report)
    steps: dict[tuple[str, str], list[tuple[tuple[datetime, int], int | None]]] = {}
    groups: dict[str | None, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.txn, []).append(row)
    for txn, group in groups.items():
        _check_transaction(txn, group, stored, steps, report)
    _check_stamps(stored, versions, report)
    for account in sorted(stored.portfolios):
        report.accounts += 1
        _compare_account(world, account, steps, versions, report)
    _check_journal_ends(world, report)
    return report


def _queue_rows(world: World, lost: Sequence[tuple[str, tuple]]) -> list[Row]:
    """Every row of both queue tables, and the lost ones."""
    rows = [
        Row(queue, *row) for queue, table in TABLES.items() for row in world.q(f"SELECT {ROW_COLUMNS} FROM {table}")
    ]
    return rows + [Row(queue, *row, lost=True) for queue, row in lost]


def _read_stored(world: World) -> Stored:
    """Read the transactions, portfolios, ledger (each record with its journal record) and parked entries."""
    txns = {
        t: (status, account, kind)
        for t, status, account, kind in world.p(
            "SELECT id::text, status, accountid, transaction_type FROM portfolio_transactions"
        )
    }
    records: dict[str | None, list[Record]] = {}
    rows = world.p(
        "SELECT a.queue, a.queue_id, a.txn_id::text, a.status, a.applied_at, j.kind, j.tier_version, j.cycle"
        " FROM consistency.applied_entries a LEFT JOIN consistency.journal j"
        " ON j.queue = a.queue AND j.queue_id = a.queue_id AND j.at = a.applied_at AND j.kind IN ('applied', 'adopted')"
    )
    for row in rows:
        records.setdefault(row[2], []).append(Record(*row))
    parked = world.p("SELECT queue, queue_id, uuid FROM consistency.parked_entries")
    return Stored(
        txns,
        {account for (account,) in world.p("SELECT accountid FROM user_portfolios")},
        records,
        {(queue, queue_id, same_transaction(uuid)) for queue, queue_id, uuid in parked},
    )


def _tier_versions(world: World, updates: Sequence[TierUpdate] | None, report: Report) -> dict[int, Version]:
    """Map each tier_value_history id that names values in force to the values the harness set, checking that the
    history holds what the harness sent, in the order it sent it (every update after the seed changes every tier)."""
    history = world.p(
        "SELECT id, tier, new_pool, new_market, changed_at FROM consistency.tier_value_history ORDER BY id"
    )
    if updates is None:  # the tiers stayed TIERS: whatever the history holds, its newest id names them
        newest = history[-1] if history else (0, 0, 0, 0, datetime.min.replace(tzinfo=UTC))
        report.tier_versions = 1
        return {newest[0]: Version({k: Decimal(v) for k, v in TIERS.items()}, newest[4])}
    sent = [{k: Decimal(v) for k, v in TIERS.items()}, *_stored_updates(updates, report)]
    versions, at = {}, 0
    for before, values in zip([None, *sent], sent, strict=False):
        changed = [n for n in (1, 2, 3) if before is None or _tier(before, n) != _tier(values, n)]
        if not changed:
            continue
        rows = history[at : at + len(changed)]
        at += len(changed)
        if [(r[1], r[2], r[3]) for r in rows] != [(n, *_tier(values, n)) for n in changed]:
            report.mismatches.append(f"tier_value_history {rows} does not hold what the harness set: {values}")
            continue
        versions[rows[-1][0]] = Version(values, rows[-1][4])
    if history[at:]:
        report.mismatches.append(f"tier_value_history holds updates the harness never sent: {history[at:]}")
    report.tier_versions = len(versions)
    return versions


def _stored_updates(updates: Sequence[TierUpdate], report: Report) -> list[dict[str, Decimal]]:
    """The values of the updates the API accepted, in the order sent, each checked against its answer."""
    stored = []
    for update in (u for u in updates if u.status == 200):
        answered = {k: Decimal(v) for k, v in update.answer["tiers"].items() if k in TIERS}
        if answered != update.values:
            report.mismatches.append(f"tier update answered {answered}, the harness sent {update.values}")
        stored.append(update.values)
    return stored


def _tier(values: dict[str, Decimal], n: int) -> tuple[Decimal, Decimal]:
    """One tier's pool and market value."""
    return values[f"TIER{n}"], values[f"TIER{n}_MV"]


def _check_transaction(txn: str | None, rows: list[Row], stored: Stored, steps: dict, report: Report) -> None:
    """Check the queue rows that name one portfolio transaction against what the service recorded."""
    records = stored.records.get(txn, []) if txn else []
    applied = {(r.queue, r.queue_id) for r in records}
    settled_before = {r.key for r in rows if r.lost and r.status in SETTLED}  # a restore took the settlement back
    for row in rows:
        if (
            row.status not in SETTLED
            and not row.lost
            and row.key not in settled_before
            and (row.queue, row.queue_id) in applied
        ):
            report.mismatches.append(f"{row.key} is {row.status} but was applied")
    settled = sorted((r for r in rows if r.status in SETTLED), key=lambda r: (r.updated_at, r.queue_id))
    present = [r for r in settled if not r.lost]
    report.settled += len(present)
    if len(records) != 1:
        _check_unrecorded(txn, records, present, stored, report)
        return
    record = records[0]
    settler = next((r for r in settled if (r.queue, r.queue_id) == (record.queue, record.queue_id)), None)
    source = settler or (present[0] if present else None)  # no settler: its row was deleted and queued again
    if source is None:
        report.mismatches.append(f"{record.queue} entry {record.queue_id} applied {txn}, which no settled row names")
        return
    if settler is not None and not settler.lost and settler is not present[0]:
        report.mismatches.append(f"{settler.key} settled transaction {txn}, but {present[0].key} came first")
    for row in present:
        if row is not settler and row.key not in stored.parked:
            report.mismatches.append(f"{row.key} names transaction {txn}, settled once already, and is not parked")
    if record.kind != "adopted":  # adopted: recorded without moving money (the baseline)
        _check_settlement(source, record, stored, steps, report)


def _check_settlement(source: Row, record: Record, stored: Stored, steps: dict, report: Report) -> None:
    """The row that settled a transaction: recorded with its status, the transaction mirroring it, and, when it
    completed, a step of its portfolio's compounding."""
    found = stored.txns.get(source.txn or "", ("missing",))[0]
    if (record.status, found) != (source.status, MIRROR[source.status]):
        report.mismatches.append(f"{source.key} is {source.status}: recorded {record.status}, transaction {found}")
    if source.status == "COMPLETED":
        position = (source.updated_at, source.queue_id)
        steps.setdefault((source.account, source.queue), []).append((position, record.tier_version))
        report.completed += 1


def _check_unrecorded(
    txn: str | None, records: list[Record], present: list[Row], stored: Stored, report: Report
) -> None:
    """A transaction the ledger does not record once: none of its rows could apply, each is parked, and the
    transaction is still PENDING."""
    if records:
        report.mismatches.append(f"transaction {txn} has {len(records)} applied records")
        return
    if txn in stored.txns and stored.txns[txn][0] != "PENDING":
        report.mismatches.append(f"transaction {txn} is {stored.txns[txn][0]} but the ledger records no entry for it")
    for row in present:
        if row.key not in stored.parked:
            report.mismatches.append(f"{row.key} is settled but neither applied nor parked")
        if _can_apply(row, stored):
            report.mismatches.append(f"{row.key} could apply, but its transaction has no applied record")


def _can_apply(row: Row, stored: Stored) -> bool:
    """Tell whether nothing docs/concepts/parked-entries.md lists would stop a settled row from applying (row locks
    aside)."""
    if row.status == "COMPLETED" and row.account not in stored.portfolios:
        return False
    found = stored.txns.get(row.txn or "")
    return found is not None and found[1] == row.account and found[2] == TYPES[row.queue]


def _check_stamps(stored: Stored, versions: dict[int, Version], report: Report) -> None:
    """Each ledger record has its journal record; each completed one names tier values stored before it was
    applied, and every record of a cycle names the same ones (tier values are read once per cycle)."""
    per_cycle: dict[int, set[int | None]] = {}
    for record in (r for records in stored.records.values() for r in records):
        if record.kind is None:
            report.mismatches.append(f"{record.queue, record.queue_id, record.txn} has no journal record of it")
        if record.kind != "applied" or record.status != "COMPLETED":
            continue
        per_cycle.setdefault(record.cycle, set()).add(record.tier_version)
        version = versions.get(record.tier_version or 0)
        if version is None:
            report.mismatches.append(f"{record.queue, record.queue_id} names tier version {record.tier_version}")
        elif version.changed_at >= record.applied_at:
            report.mismatches.append(
                f"{record.queue, record.queue_id} applied at {record.applied_at} with tier version"
                f" {record.tier_version}, stored at {version.changed_at}"
            )
    for cycle, named in per_cycle.items():
        if len(named) > 1:
            report.mismatches.append(f"cycle {cycle} applied entries under tier versions {sorted(map(str, named))}")


def _check_journal_ends(world: World, report: Report) -> None:
    """Every applied record has one ledger record, and each portfolio's last completed record ends at the amounts
    the portfolio holds."""
    (orphans,) = world.p(
        "SELECT count(*) FROM consistency.journal j WHERE j.kind IN ('applied', 'adopted') AND NOT EXISTS"
        " (SELECT 1 FROM consistency.applied_entries a"
        "   WHERE a.queue = j.queue AND a.queue_id = j.queue_id AND a.applied_at = j.at)"
    )[0]
    (told, recorded) = world.p(
        "SELECT (SELECT count(*) FROM consistency.journal WHERE kind IN ('applied', 'adopted')),"
        " (SELECT count(*) FROM consistency.applied_entries)"
    )[0]
    if orphans or told != recorded:
        report.mismatches.append(
            f"{told} journal records of applications ({orphans} with no ledger record), {recorded} ledger records"
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


def _compare_account(world: World, account: str, steps: dict, versions: dict[int, Version], report: Report) -> None:
    """Compare one portfolio with its completed entries compounded in (updated_at, queue_id) order, each with the
    tier values in force when it was applied, each step rounded half away from zero to cents."""
    got = world.amounts(account)
    for queue, kind, start in (("investment", "value", START_VALUES), ("withdrawal", "allocation", START_ALLOCATIONS)):
        want = [Decimal(amount) for amount in start]
        for _, version in sorted(steps.get((account, queue), []), key=lambda step: step[0]):
            values = versions.get(version or 0)
            if values is None:
                continue  # reported by _check_stamps; the amounts then differ too
            for n in (1, 2, 3):
                pool, market = _tier(values.values, n)
                num = market if queue == "investment" else 2 * pool - market
                want[n - 1] = expected(want[n - 1], (str(num), str(pool)))
        for n in (1, 2, 3):
            if got[f"tier{n}_{kind}"] != want[n - 1]:
                report.mismatches.append(f"{account} tier{n}_{kind} {got[f'tier{n}_{kind}']} != {want[n - 1]}")
        total = sum((got[f"tier{n}_{kind}"] for n in (1, 2, 3)), Decimal(0))
        if got[f"total_{kind}"] != total:
            report.mismatches.append(f"{account} total_{kind} {got[f'total_{kind}']} != {total}")
