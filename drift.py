"""Drift checks: proof that the queue, the ledger and the portfolio transactions agree, chunk by chunk.

One check runs at a time across every process and replica: the process that runs it holds a session-level
advisory lock on a connection of its own for the whole check, which frees itself if the process dies. The
check stores where each phase goes on after every chunk, so that whichever process takes the turn next
resumes an unfinished check rather than starting a new one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2.extras import Json

import audit
import metrics
from config import Settings
from db import (
    APPLICATION_NAME,
    Database,
    DatabaseError,
    fetch_page,
    first_line,
    in_transaction,
    json_rows,
    one_row,
    pg_array,
)
from domain import DRIFT_KINDS
from drift_walk import PHASES, Chunk, Connection, Finding, Key, Phase, read_chunk
from queries import query

log = logging.getLogger(__name__)

# Any constant shared by every process of the service, apart from the cycle and migration locks: the check turn.
DRIFT_LOCK_KEY = 0x434D_4452_4654  # "CMDRFT"
DRIFT_SESSION = f"{APPLICATION_NAME}-drift"  # the name of the lock's connection in pg_stat_activity
SCHEDULE = "schedule"  # who started a check that the schedule started
FINDINGS_KEPT = 1000  # findings stored per kind and check; the counts stay exact beyond it
CHUNK_SIZE = 5000  # rows per chunk, each read in a transaction of its own
PAUSE = 0.01  # seconds between chunks
TICK = 5.0  # seconds between two looks at whether a check is due, at most
STOP_TIMEOUT = 5.0  # how long stop() waits for the check's current chunk


class CheckRunning(Exception):
    """A drift check is already running; a new one is not started."""

    def __init__(self, check_id: int) -> None:
        super().__init__(f"drift check {check_id} is already running")
        self.check_id = check_id


@dataclass(frozen=True)
class Poll:
    """What a look at the stored checks tells: whether one is running or due, and whether a process holds the turn."""

    running: bool
    due: bool
    locked: bool


@dataclass
class CheckState:
    """A running check as stored: where each phase goes on, the rows read and the findings counted so far."""

    id: int
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows_read: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DRIFT_KINDS, 0))

    def next_step(self) -> tuple[Phase, Key] | None:
        """Return the phase to read next and the key its next chunk starts at; None when every phase is done."""
        for phase in PHASES:
            position = self.positions.get(phase.name, {})
            if not position.get("done"):
                return phase, position.get("next", phase.first)
        return None

    def absorb(self, phase: Phase, chunk: Chunk) -> list[Finding]:
        """Count a chunk in, move its phase on, and return its findings that are to be stored."""
        kept = []
        for finding in chunk.findings:
            if self.counts[finding.kind] < FINDINGS_KEPT:
                kept.append(finding)
            self.counts[finding.kind] += 1
        self.rows_read += chunk.rows
        done = chunk.following is None
        self.positions[phase.name] = {"done": True} if done else {"next": chunk.following}
        return kept

    def progress(self) -> dict[str, Any]:
        """Return the stored form of where the check stands."""
        return {
            "id": self.id,
            "positions": Json(self.positions),
            "rows_read": self.rows_read,
            "counts": Json(self.counts),
        }


class DriftChecks:
    """Starts, runs, resumes and reports drift checks: on request, and every DRIFT_CHECK_INTERVAL in a daemon thread."""

    def __init__(
        self,
        settings: Settings,
        queue_db: Database,
        portfolio_db: Database,
        chunk_size: int = CHUNK_SIZE,
        pause: float = PAUSE,
    ) -> None:
        self.settings = settings
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db
        self.chunk_size = chunk_size
        self.pause = pause
        interval = settings.drift_check_interval
        self.tick = min(TICK, interval / 4) if interval else TICK
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self, actor: str, reason: str | None) -> dict[str, Any]:
        """Store a new check started by `actor`, audited in the same transaction; the thread runs it.

        Raises CheckRunning when a check is running already.
        """
        try:
            with self.portfolio_db.transaction() as cur:
                _refuse_if_running(cur)
                cur.execute(query("drift_insert_check"), {"started_by": actor, "reason": reason, "counts": _zeros()})
                check = json_rows(cur)[0]
                audit.record(cur, actor, audit.START_DRIFT_CHECK, {"drift_check": check["id"]}, reason)
        except DatabaseError as err:
            if isinstance(err.__cause__, psycopg2.errors.UniqueViolation):  # another one started meanwhile
                with self.portfolio_db.transaction() as cur:
                    _refuse_if_running(cur)
            raise
        self._wake.set()
        return check

    def latest(self) -> dict[str, Any] | None:
        """Return the newest check's report with the findings it kept, or None when no check is stored."""
        return self.report(None)

    def page(self, limit: int, before: int | None) -> dict[str, Any]:
        """List every check, newest first, `limit` at a time below the id `before`, each with its counts by kind."""
        with self.portfolio_db.transaction() as cur:
            page = fetch_page(cur, "list_drift_checks", {"before": before}, limit)
        return {**page, "entries": [_counted(check) for check in page["entries"]]}

    def report(self, check_id: int | None) -> dict[str, Any] | None:
        """Return a check's report with the findings it kept (the newest's when the id is None), or None if none."""
        with self.portfolio_db.transaction() as cur:
            cur.execute(query("drift_check"), {"id": check_id})
            rows = json_rows(cur)
            if not rows:
                return None
            cur.execute(query("drift_findings_of"), {"check_id": rows[0]["id"]})
            findings = json_rows(cur)
        return {**_counted(rows[0]), "findings_kept_per_kind": FINDINGS_KEPT, "findings": findings}

    def start(self) -> None:
        """Start the daemon thread that runs requested, unfinished and scheduled checks."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="drift-checks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the thread after the current chunk; a check it was running stays stored, to be resumed."""
        self.stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def describe(self, err: Exception) -> str:
        """Describe a database error without any credential."""
        return self.portfolio_db.redact(self.queue_db.redact(first_line(err)))

    def _loop(self) -> None:
        """Look every tick (at once when a check is requested here) whether a check is to run, and run it."""
        failing = False
        while not self.stopping.is_set():
            self._wake.wait(self.tick)
            self._wake.clear()
            if self.stopping.is_set():
                break
            try:
                self.run_due()
                if failing:
                    log.info("drift checks: user-portfolio-db answers again")
                failing = False
            except (DatabaseError, psycopg2.Error) as err:
                if not failing:  # once per spell of failures; the next tick tries again
                    log.warning("drift checks: cannot look for a due check: %s", self.describe(err))
                failing = True

    def run_due(self) -> int | None:
        """Run, in the calling thread, the check that is due if this process gets the turn; return its id.

        Due: a check that is running with no process holding the turn (requested, or left by a process that
        stopped or died), or a new one when the newest stored started more than DRIFT_CHECK_INTERVAL ago.
        """
        poll = self._poll()
        if poll.locked or not (poll.running or poll.due):
            return None
        conn = self.portfolio_db.dedicated(DRIFT_SESSION)
        try:
            conn.autocommit = False
            with in_transaction(conn) as cur:
                cur.execute(query("drift_try_lock"), {"key": DRIFT_LOCK_KEY})
                if not one_row(cur)[0]:
                    return None  # another process took the turn since the poll
            state = self._claim(conn)
            if state is not None:
                CheckTurn(self, conn).run(state)
            return None if state is None else state.id
        finally:
            conn.close()  # which frees the lock

    def _poll(self) -> Poll:
        """Read whether a check is running or due and whether a process holds the turn; refresh the metrics."""
        with self.portfolio_db.transaction() as cur:
            poll = self._look(cur)
            cur.execute(query("drift_last_done"))
            done = cur.fetchone()
        if done is not None:
            metrics.observe_drift(done[0], done[1])
        return poll

    def _look(self, cur: psycopg2.extensions.cursor) -> Poll:
        """Read whether a check is running or due, and whether a process holds the turn."""
        interval = self.settings.drift_check_interval
        params = {"interval": interval, "key_high": DRIFT_LOCK_KEY >> 32, "key_low": DRIFT_LOCK_KEY & 0xFFFF_FFFF}
        cur.execute(query("drift_poll"), params)
        newest, state, due, locked = one_row(cur)
        return Poll(running=state == "running", due=interval > 0 and (newest is None or bool(due)), locked=locked)

    def _claim(self, conn: Connection) -> CheckState | None:
        """Holding the turn: return the running check to resume, or a new scheduled one when due, or None."""
        for _ in range(2):  # a check requested between the look and the insert is the one to run
            try:
                with in_transaction(conn) as cur:
                    cur.execute(query("drift_running"))
                    row = cur.fetchone()
                    if row is not None:
                        return CheckState(row[0], row[3], row[4], {**_zeros_dict(), **row[5]})
                    if not self._look(cur).due:
                        return None
                    params = {"started_by": SCHEDULE, "reason": None, "counts": _zeros()}
                    cur.execute(query("drift_insert_check"), params)
                    return CheckState(one_row(cur)[0])
            except psycopg2.errors.UniqueViolation:
                continue
        return None


class CheckTurn:
    """Runs one check for the process that holds the turn, on its connection: chunk by chunk, stored after each."""

    def __init__(self, checks: DriftChecks, conn: Connection) -> None:
        self._checks = checks
        self._conn = conn

    def run(self, state: CheckState) -> None:
        """Walk every phase chunk by chunk from where the check stands, storing after each; stop when asked."""
        log.info("drift check %d %s", state.id, "resumed" if state.positions else "started")
        clock = time.monotonic()
        try:
            while (step := state.next_step()) is not None:
                if self._checks.stopping.is_set():
                    log.info("drift check %d stopped after %d rows; it resumes there", state.id, state.rows_read)
                    return
                chunk = read_chunk(step[0], self._checks.queue_db, self._conn, step[1], self._checks.chunk_size)
                self._store(state, state.absorb(step[0], chunk))
                self._checks.stopping.wait(self._checks.pause)
            self._finish(state, "done", None)
        except (DatabaseError, psycopg2.Error) as err:
            self._fail(state, err)
            return
        seconds = time.monotonic() - clock
        found = ", ".join(f"{kind}={state.counts[kind]}" for kind in DRIFT_KINDS)
        level = logging.WARNING if any(state.counts.values()) else logging.INFO
        log.log(
            level, "drift check %d done in %.1fs, %d rows read; findings %s", state.id, seconds, state.rows_read, found
        )

    def _store(self, state: CheckState, kept: list[Finding]) -> None:
        """Store a chunk's kept findings and where the check stands, in one transaction."""
        with in_transaction(self._conn) as cur:
            if kept:
                cur.execute(query("drift_insert_findings"), _finding_arrays(state.id, kept))
            cur.execute(query("drift_save_progress"), state.progress())

    def _finish(self, state: CheckState, outcome: str, error: str | None) -> None:
        """End the check as done or failed; a done check sets the metrics."""
        with in_transaction(self._conn) as cur:
            cur.execute(query("drift_finish"), {"id": state.id, "state": outcome, "error": error})
            row = cur.fetchone()
        if outcome == "done" and row is not None:
            metrics.observe_drift(state.counts, row[0])

    def _fail(self, state: CheckState, err: Exception) -> None:
        """End a check a database error stopped; without its connection (and so the turn) leave it to be resumed."""
        detail = self._checks.describe(err)
        if self._conn.closed or self._checks.stopping.is_set():  # the service stops: its pools may be closed already
            log.warning("drift check %d interrupted; it resumes where it stands: %s", state.id, detail)
            return
        log.warning("drift check %d failed: %s", state.id, detail)
        try:
            self._finish(state, "failed", detail)
        except psycopg2.Error as again:
            log.warning("drift check %d could not be marked failed: %s", state.id, self._checks.describe(again))


def _refuse_if_running(cur: psycopg2.extensions.cursor) -> None:
    """Raise CheckRunning if a check is running."""
    cur.execute(query("drift_running"))
    row = cur.fetchone()
    if row is not None:
        raise CheckRunning(row[0])


def _zeros_dict() -> dict[str, int]:
    """Return no findings of any kind."""
    return dict.fromkeys(DRIFT_KINDS, 0)


def _counted(check: dict[str, Any]) -> dict[str, Any]:
    """Return a stored check with a count of every kind: one stored before a kind existed found none of it."""
    return {**check, "counts": {**_zeros_dict(), **check["counts"]}}


def _zeros() -> Json:
    """Return no findings of any kind, to store."""
    return Json(_zeros_dict())


def _finding_arrays(check_id: int, findings: list[Finding]) -> dict[str, Any]:
    """Return findings as the parallel arrays drift_insert_findings takes."""
    return {
        "check_id": check_id,
        "kinds": pg_array(f.kind for f in findings),
        "queues": pg_array(f.queue for f in findings),
        "queue_ids": pg_array(f.queue_id for f in findings),
        "uuids": pg_array(f.uuid for f in findings),
        "txn_ids": pg_array(f.txn_id for f in findings),
        "accounts": pg_array(f.account for f in findings),
        "details": pg_array(json.dumps(f.detail) for f in findings),
    }
