"""The eight-step consistency cycle: deltas, both queues in bounded batches, and the watermarks."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2.extras import Json

import metrics
import migrations
import tiers
from apply import (
    apply_entries,
    apply_loaded,
    apply_one_by_one,
    copy_batch,
    load_copied,
    park,
)
from config import Settings
from db import Database, DatabaseError, first_line, in_transaction, pg_array
from domain import OPEN, QUEUES, TERMINAL, Entry, Position, Queue
from poller import Heartbeat
from queries import query, table_query

log = logging.getLogger(__name__)

Connection = psycopg2.extensions.connection

# Any constant shared by every process of the service: the turn to run a cycle.
CYCLE_LOCK_KEY = 0x434D_4359_434C  # "CMCYCL"
# Covers the instant between a writer's transaction start and its showing in pg_stat_activity.
HORIZON_MARGIN = timedelta(seconds=1)
# An open queue-db transaction older than this holds the watermarks back long enough to say so.
HELD_WARNING_SECONDS = 60.0
MAX_QUEUE_ID = 2**31 - 1
ONE_MICROSECOND = timedelta(microseconds=1)
# Where the stored watermark stays while queue-db has prepared transactions: it never moves back.
HOLD = datetime(1970, 1, 1, tzinfo=UTC)
EXACT, LOOKBACK = "exact", "lookback"
COUNT_KEYS = ("read", *TERMINAL, "parked", "corrected", "reconciled")


@dataclass(frozen=True)
class Horizon:
    """How far the stored watermark may move: every entry updated before `bound` is committed."""

    mode: str
    bound: datetime
    # Seconds the oldest open queue-db transaction, prepared ones included, has been open (exact mode; None
    # when there is none).
    held_for: float | None = None
    # Prepared (two-phase) transactions on queue-db: no view shows when they began, so the watermark holds.
    prepared: int = 0
    # Sessions running with track_activities off: their transactions' start cannot be seen.
    untracked: int = 0

    @property
    def position(self) -> Position:
        """Return the highest position the stored watermark may take."""
        return (self.bound - ONE_MICROSECOND, MAX_QUEUE_ID)


def read_horizon(queue_conn: Connection, lookback: float) -> Horizon:
    """Bound the watermark by the oldest open queue-db transaction, or by the look-back window.

    A session whose transaction start is hidden (track_activities off) turns this cycle to the look-back
    rule; a prepared transaction, whose start no view shows, holds the watermark where it is.
    """
    with queue_conn.cursor() as cur:
        cur.execute(query("queue_horizon"))
        exact, oldest, untracked, prepared, oldest_prepared, now = cur.fetchone()
    if exact and not untracked:
        # A prepared transaction began before it was prepared: its age is at least the time since then.
        holder = min((t for t in (oldest, oldest_prepared) if t is not None), default=None)
        held_for = round((now - holder).total_seconds(), 1) if holder and holder < now else None
        bound = HOLD if prepared else min(oldest or now, now) - HORIZON_MARGIN
        return Horizon(EXACT, bound, held_for, prepared)
    return Horizon(LOOKBACK, now - timedelta(seconds=lookback), untracked=untracked if exact else 0)


def read_queue(queue_conn: Connection, name: str, table: str, params: dict[str, Any]) -> list[Entry]:
    """Run a named read on a queue table and return its rows as entries."""
    with queue_conn.cursor() as cur:
        cur.execute(table_query(name, table), params)
        return [Entry(*row) for row in cur.fetchall()]


class CycleRunner:
    """Runs the cycle against the two databases, one applier at a time across all processes."""

    def __init__(
        self,
        settings: Settings,
        queue_db: Database,
        portfolio_db: Database,
        stopping: threading.Event,
        heartbeat: Heartbeat,
    ) -> None:
        self.settings = settings
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db
        self.stopping = stopping
        self.heartbeat = heartbeat
        self.mode: str | None = None
        self._held = False
        self._holding_prepared = False
        # A cycle ran under the look-back rule for want of a visible start: exact mode sweeps once after it.
        self._sweep_owed = False
        self._prepared = False
        self._last_reconcile = float("-inf")

    def prepare(self) -> None:
        """Migrate the state schema, seed the tier values and check the queue indexes, once."""
        if self._prepared:
            return
        with self.portfolio_db.transaction() as cur:
            migrations.migrate(cur)
            tiers.seed(cur, self.settings.tier_seed)
        with self.queue_db.connection(autocommit=True) as conn, conn.cursor() as cur:
            missing = migrations.missing_watermark_indexes(cur, [q.table for q in QUEUES])
            naive, timezone = migrations.naive_timestamp_columns(cur, [q.table for q in QUEUES])
        for table in missing:
            log.warning(
                "queue-db table %s has no index on (updated_at, queue_id): every cycle will scan it; "
                "create it as in schema/queue_db.sql",
                table,
            )
        for table in naive:
            log.warning(
                "queue-db column %s.updated_at is timestamp without time zone: its values are read as local "
                "times in queue-db's TimeZone (%s), the one the writers' CURRENT_TIMESTAMP follows",
                table,
                timezone,
            )
        self._prepared = True

    def run(self, lock_wait: float = 0.0) -> dict[str, Any]:
        """Run one cycle if this process gets the turn within lock_wait seconds; return its summary."""
        started = datetime.now(UTC)
        clock = time.monotonic()
        summary: dict[str, Any] = {"started_at": started.isoformat(), "result": "skipped"}
        try:
            self.prepare()
            with self.portfolio_db.connection() as pconn, self.queue_db.connection(autocommit=True) as qconn:
                if _take_turn(pconn, lock_wait):
                    try:
                        summary.update(self._cycle(pconn, qconn), result="ok")
                    finally:
                        _give_turn(pconn)
                    self._save(pconn, summary, clock)
        except (DatabaseError, psycopg2.Error, tiers.TiersNotStored) as err:
            summary.update(result="error", error=self._describe(err))  # the poller logs the summary
        summary["duration_ms"] = round((time.monotonic() - clock) * 1000, 1)
        return summary

    def _cycle(self, pconn: Connection, qconn: Connection) -> dict[str, Any]:
        """Steps 1 to 8, plus parked retries and, in look-back mode, the reconciliation sweep."""
        with in_transaction(pconn) as cur:
            current = tiers.load(cur)
            cur.execute(query("select_cycle_start"))
            starts = {queue: ((ts, queue_id), parked) for queue, ts, queue_id, parked in cur.fetchall()}
        factors = {
            "investment": tuple(t.invest_factor for t in current),
            "withdrawal": tuple(t.withdraw_factor for t in current),
        }
        horizon = read_horizon(qconn, self.settings.lookback_window)
        self._note_mode(horizon)
        self._note_held(horizon.held_for)
        self._note_prepared(horizon.prepared)
        counts: dict[str, Counter[str]] = {queue.name: Counter() for queue in QUEUES}
        for queue in QUEUES:
            watermark, any_parked = starts[queue.name]
            if any_parked:
                counts[queue.name] += self._retry_parked(pconn, qconn, queue, factors[queue.name])
            counts[queue.name] += self._drain(pconn, qconn, queue, factors[queue.name], horizon, watermark)
        reconciled = not self.stopping.is_set() and self._reconcile_due(horizon)
        if reconciled:
            for queue in QUEUES:
                counts[queue.name] += self._reconcile(pconn, qconn, queue, factors[queue.name])
            if horizon.mode == EXACT and not self.stopping.is_set():
                self._sweep_owed = False
        return {
            "mode": horizon.mode,
            "horizon": horizon.bound.isoformat(),
            "oldest_transaction_s": horizon.held_for,
            "prepared_transactions": horizon.prepared,
            "untracked_sessions": horizon.untracked,
            "reconciled": reconciled,
            "counts": {name: {key: c[key] for key in COUNT_KEYS} for name, c in counts.items()},
            "stopped_early": self.stopping.is_set(),
            "error": None,
        }

    def _drain(
        self,
        pconn: Connection,
        qconn: Connection,
        queue: Queue,
        factors: tuple[Fraction, ...],
        horizon: Horizon,
        after: Position,
    ) -> Counter[str]:
        """Steps 2-4 or 5-7 and 8: apply the entries changed since the watermark `after`, batch by batch.

        Only the process holding the cycle lock moves a watermark, so the one read at the cycle's start holds.
        """
        counts: Counter[str] = Counter({"read": 0})
        size = self.settings.batch_size
        while not self.stopping.is_set():
            with qconn.cursor() as qcur:
                data = copy_batch(qcur, queue, after, size)
            read, last, applied = self._apply_copied(pconn, qconn, queue, data, factors, after, horizon)
            self.heartbeat.beat()
            counts["read"] += read
            counts += applied
            if last is not None:
                metrics.observe_batch(last[0], sum(applied.values()))
            if read < size:
                break
            after = last  # type: ignore[assignment]
        return counts

    def _apply_copied(
        self,
        pconn: Connection,
        qconn: Connection,
        queue: Queue,
        data: bytes,
        factors: tuple[Fraction, ...],
        after: Position,
        horizon: Horizon,
    ) -> tuple[int, Position | None, Counter[str]]:
        """Apply a batch copied out of queue-db and move the watermark; return its size, end and outcomes."""
        if not data:
            return 0, None, Counter()  # nothing new, so no transaction to load and apply nothing
        read, last = 0, None
        try:
            with in_transaction(pconn) as cur:
                read, last = load_copied(cur, data)
                if last is None:
                    return 0, None, Counter()
                counts = apply_loaded(cur, queue, factors)
                self._advance(cur, queue, min(last, horizon.position))
            return read, last, counts
        except (psycopg2.IntegrityError, psycopg2.DataError) as err:
            if last is None:
                raise
            _log_rejected(queue, err)
        params = {"after_ts": after[0], "after_id": after[1], "last_ts": last[0], "last_id": last[1]}
        entries = read_queue(qconn, "queue_read_range", queue.table, params)
        with in_transaction(pconn) as cur:
            counts = apply_one_by_one(cur, queue, entries, factors)
            self._advance(cur, queue, min(last, horizon.position))
        return read, last, counts

    @staticmethod
    def _advance(cur: psycopg2.extensions.cursor, queue: Queue, watermark: Position) -> None:
        """Step 8: move a queue's watermark, in the transaction that applied the entries before it."""
        cur.execute(query("advance_watermark"), {"queue": queue.name, "ts": watermark[0], "id": watermark[1]})

    def _apply(
        self,
        pconn: Connection,
        queue: Queue,
        entries: list[Entry],
        factors: tuple[Fraction, ...],
        retrying: bool = False,
    ) -> Counter[str]:
        """Apply entries in one transaction; isolate the ones the database rejects."""
        try:
            with in_transaction(pconn) as cur:
                return apply_entries(cur, queue, entries, factors, retrying)
        except (psycopg2.IntegrityError, psycopg2.DataError) as err:
            _log_rejected(queue, err)
        with in_transaction(pconn) as cur:
            return apply_one_by_one(cur, queue, entries, factors, retrying)

    def _retry_parked(
        self, pconn: Connection, qconn: Connection, queue: Queue, factors: tuple[Fraction, ...]
    ) -> Counter[str]:
        """Try the parked entries again, as their queue rows stand now."""
        counts: Counter[str] = Counter()
        after: Position = (datetime(1970, 1, 1, tzinfo=UTC), 0)
        size = self.settings.batch_size
        while not self.stopping.is_set():
            with in_transaction(pconn) as cur:
                params = {"queue": queue.name, "after_ts": after[0], "after_id": after[1], "limit": size}
                cur.execute(query("select_parked_batch"), params)
                parked = [Entry(*row) for row in cur.fetchall()]
            if not parked:
                return counts
            after = parked[-1].position
            ids = {"queue_ids": pg_array(e.queue_id for e in parked)}
            current = read_queue(qconn, "queue_select_by_id", queue.table, ids)
            counts += self._settle(pconn, queue, parked, current, factors)
            self.heartbeat.beat()
            if len(parked) < size:
                return counts
        return counts

    def _settle(
        self,
        pconn: Connection,
        queue: Queue,
        parked: list[Entry],
        current: list[Entry],
        factors: tuple[Fraction, ...],
    ) -> Counter[str]:
        """Apply parked entries whose rows are still terminal; release those that no longer are."""
        # An unknown status is not open: applying parks it again, with the status in the reason.
        settled = sorted((e for e in current if e.status not in OPEN), key=lambda e: e.position)
        reopened = [e.queue_id for e in current if e.status in OPEN]
        found = {e.queue_id for e in current}
        gone = [(e, "the queue entry no longer exists") for e in parked if e.queue_id not in found]
        if reopened or gone:
            with in_transaction(pconn) as cur:
                if reopened:
                    # Their next change moves updated_at past the watermark, so the cycle will read them again.
                    cur.execute(query("unpark_entries"), {"queue": queue.name, "queue_ids": pg_array(reopened)})
                if gone:
                    park(cur, queue, gone)
        return self._apply(pconn, queue, settled, factors, retrying=True) if settled else Counter()

    def _reconcile_due(self, horizon: Horizon) -> bool:
        """Tell whether the reconciliation sweep should run in this cycle.

        It runs every RECONCILE_INTERVAL under the look-back rule, and once in exact mode after cycles that
        fell back to it: a hidden session may have committed late in between.
        """
        if horizon.untracked:
            self._sweep_owed = True
        if horizon.mode == EXACT:
            return self._sweep_owed
        if time.monotonic() - self._last_reconcile < self.settings.reconcile_interval:
            return False
        self._last_reconcile = time.monotonic()
        return True

    def _reconcile(
        self, pconn: Connection, qconn: Connection, queue: Queue, factors: tuple[Fraction, ...]
    ) -> Counter[str]:
        """Find terminal entries with no applied record, such as late commits behind the look-back."""
        counts: Counter[str] = Counter()
        after_id, size = 0, self.settings.batch_size
        while not self.stopping.is_set():
            params = {"after_id": after_id, "limit": size}
            batch = read_queue(qconn, "queue_read_terminal", queue.table, params)
            if not batch:
                return counts
            after_id = batch[-1].queue_id
            with in_transaction(pconn) as cur:
                ids = pg_array(e.queue_id for e in batch)
                cur.execute(query("filter_unapplied"), {"queue": queue.name, "queue_ids": ids})
                missing = {row[0] for row in cur.fetchall()}
            found = sorted((e for e in batch if e.queue_id in missing), key=lambda e: e.position)
            if found:
                counts["reconciled"] += len(found)
                counts += self._apply(pconn, queue, found, factors)
            self.heartbeat.beat()
            if len(batch) < size:
                return counts
        return counts

    def _note_mode(self, horizon: Horizon) -> None:
        """Log loudly which watermark mode is in force whenever it changes."""
        if horizon.mode == self.mode:
            return
        self.mode = horizon.mode
        if horizon.mode == EXACT:
            log.warning("watermark mode: exact (bounded by the oldest open queue-db transaction)")
        elif horizon.untracked:
            log.warning(
                "watermark mode: lookback while %d queue-db session(s) run with track_activities off, which "
                "hides when their transactions began; using a %gs look-back window and a reconciliation sweep",
                horizon.untracked,
                self.settings.lookback_window,
            )
        else:
            log.warning(
                "watermark mode: lookback; this role cannot see other sessions' xact_start "
                "(grant pg_read_all_stats for exact mode); using a %gs look-back window and a "
                "reconciliation sweep every %gs",
                self.settings.lookback_window,
                self.settings.reconcile_interval,
            )

    def _note_held(self, held_for: float | None) -> None:
        """Warn once when an old queue-db transaction starts holding the watermarks back, and say when it ends."""
        held = held_for is not None and held_for > HELD_WARNING_SECONDS
        if held == self._held:
            return
        self._held = held
        if held:
            log.warning(
                "a queue-db transaction has been open for %gs: the watermarks stay behind its start, and every "
                "cycle reads again the entries after them (pg_stat_activity or pg_prepared_xacts shows which)",
                held_for,
            )
        else:
            log.info("no queue-db transaction holds the watermarks back any longer")

    def _note_prepared(self, prepared: int) -> None:
        """Warn once when prepared transactions start holding the watermarks, and say when they stop."""
        holding = prepared > 0
        if holding == self._holding_prepared:
            return
        self._holding_prepared = holding
        if holding:
            log.warning(
                "queue-db has %d prepared transaction(s) (pg_prepared_xacts): no view shows when they began, so "
                "the watermarks hold until they are committed or rolled back, and every cycle reads again the "
                "entries after them",
                prepared,
            )
        else:
            log.info("no prepared queue-db transaction holds the watermarks any longer")

    def _save(self, pconn: Connection, summary: dict[str, Any], clock: float) -> None:
        """Store the cycle's summary where every process can read it."""
        summary["duration_ms"] = round((time.monotonic() - clock) * 1000, 1)
        with in_transaction(pconn) as cur:
            cur.execute(query("save_last_cycle"), {"summary": Json(summary)})

    def _describe(self, err: Exception) -> str:
        """Describe a cycle failure without any credential."""
        return self.portfolio_db.redact(self.queue_db.redact(first_line(err)))


def _log_rejected(queue: Queue, err: psycopg2.Error) -> None:
    """Say that the database rejected a batch, which is now applied entry by entry."""
    log.warning("a %s batch was rejected (%s); applying it entry by entry", queue.name, err.diag.message_primary)


def _take_turn(pconn: Connection, wait: float) -> bool:
    """Take the cycle lock, waiting up to `wait` seconds for another process to finish."""
    deadline = time.monotonic() + wait
    while True:
        with in_transaction(pconn) as cur:
            cur.execute(query("try_cycle_lock"), {"key": CYCLE_LOCK_KEY})
            if cur.fetchone()[0]:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def _give_turn(pconn: Connection) -> None:
    """Release the cycle lock, unless the connection is already gone (which released it)."""
    if pconn.closed:
        return
    with in_transaction(pconn) as cur:
        cur.execute(query("cycle_unlock"), {"key": CYCLE_LOCK_KEY})
