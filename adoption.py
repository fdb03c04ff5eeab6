"""Adopting the service on a running system: the baseline before which settled entries are not applied.

Two ways set it, per queue, in consistency.baseline: INITIAL_WATERMARK, for a queue that has read nothing yet,
and the baseline action, which records the settled entries before a time as applied without moving money.
The reconciliation sweep leaves entries before the baseline alone, and /status shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg2.extensions

import audit
import journal
from config import Settings
from db import Database, DatabaseError, in_transaction, one_row, pg_array
from domain import (
    BY_BASELINE_ACTION,
    BY_INITIAL_WATERMARK,
    QUEUE_DB,
    QUEUES,
    TERMINAL,
    Entry,
    InputError,
    Position,
    Queue,
)
from horizon import read_horizon
from migrations import MIGRATION_LOCK_KEY
from queries import query, table_query

log = logging.getLogger(__name__)

Cursor = psycopg2.extensions.cursor
Connection = psycopg2.extensions.connection

# Why INITIAL_WATERMARK records an entry as adopted, in its journal record.
SETTLED_BEFORE_START = "settled before INITIAL_WATERMARK, committed when the service started the queue there"
# A baseline stands before the first entry of its time: entries updated at it or later are applied.
FIRST_ID = 0


@dataclass(frozen=True)
class Baseline:
    """Where a queue was adopted: the settled entries before `position` are not applied by this service."""

    queue: str
    position: Position
    source: str
    set_by: str | None
    set_at: datetime

    def to_json(self) -> dict[str, Any]:
        """Return the baseline as /status shows it."""
        ts, queue_id = self.position
        at = self.set_at.isoformat()
        return {
            "updated_at": ts.isoformat(),
            "queue_id": queue_id,
            "source": self.source,
            "set_by": self.set_by,
            "set_at": at,
        }

    def describe(self) -> str:
        """Say in a sentence what the baseline means and who set it, for the start-up warning."""
        who = self.source if self.source == BY_INITIAL_WATERMARK else f"the baseline action of {self.set_by}"
        return (
            f"adoption baseline in force for the {self.queue} queue: settled entries updated before "
            f"{self.position[0].isoformat()} are not applied by this service, nor by its reconciliation sweep "
            f"(set by {who} at {self.set_at.isoformat()})"
        )


@dataclass(frozen=True)
class BaselineRequest:
    """A baseline action as an operator asked for it: the time, why, and whether only to count."""

    before: datetime
    reason: str
    dry_run: bool


@dataclass(frozen=True)
class BaselineReport:
    """What a baseline action found per queue: the entries it would record (dry run) or recorded."""

    before: datetime
    dry_run: bool
    entries: dict[str, int]
    audit_id: int | None = None
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the answer of the baseline endpoint."""
        return {
            "before": self.before.isoformat(),
            "dry_run": self.dry_run,
            "entries": self.entries,
            "audit_id": self.audit_id,
            "baseline": self.baseline,
        }


def _no_later_than(wanted: datetime | str | None, now: datetime) -> datetime:
    """Return INITIAL_WATERMARK's time, or `now` when it asks for now or for a later time."""
    try:
        return wanted if isinstance(wanted, datetime) and wanted < now else now
    except OverflowError:  # a time within a day of year 1 or 9999, in an offset that cannot be made UTC
        return now if isinstance(wanted, datetime) and wanted.year > 1 else datetime.min.replace(tzinfo=UTC)


def baseline_row(queue: str, row: Sequence[Any]) -> Baseline:
    """Build a baseline from (updated_at, queue_id, source, set_by, set_at)."""
    ts, queue_id, source, set_by, set_at = row
    return Baseline(queue, (ts, queue_id), source, set_by, set_at)


def read_baselines(cur: Cursor) -> dict[str, Baseline]:
    """Return the baseline in force per queue; a queue without one is left out."""
    cur.execute(query("select_baselines"))
    return {row[0]: baseline_row(row[0], row[1:]) for row in cur.fetchall()}


def baseline_of(cur: Cursor, queue: str) -> Position | None:
    """Return a queue's baseline position, or None when it has none."""
    cur.execute(query("select_baseline"), {"queue": queue})
    row = cur.fetchone()
    return None if row is None else (row[0], row[1])


def adopt(cur: Cursor, queue: str, entries: Sequence[Entry], reason: str, actor: str | None) -> int:
    """Record settled entries as applied without moving money, each with an adopted journal record; return how many.

    An entry already recorded (under itself or its portfolio transaction), parked or resolved is left as it is.
    """
    params = {
        "queue": queue,
        "queue_ids": pg_array(e.queue_id for e in entries),
        "accounts": pg_array(e.account_number for e in entries),
        "uuids": pg_array(e.uuid for e in entries),
        "statuses": pg_array(e.status for e in entries),
        "updated": pg_array(e.updated_at for e in entries),
        "kind": journal.ADOPTED,
        "reason": reason,
        "actor": actor,
    }
    cur.execute(query("adopt_entries"), params)
    recorded: int = one_row(cur)[0]
    return recorded


def count_adoptable(cur: Cursor, queue: str, entries: Sequence[Entry]) -> int:
    """Count the settled entries that `adopt` would record, changing nothing."""
    params = {
        "queue": queue,
        "queue_ids": pg_array(e.queue_id for e in entries),
        "uuids": pg_array(e.uuid for e in entries),
    }
    cur.execute(query("count_adoptable"), params)
    found: int = one_row(cur)[0]
    return found


def queue_clock(qconn: Connection) -> datetime:
    """Return queue-db's time, the clock of its entries' updated_at."""
    with qconn.cursor() as cur:
        cur.execute(query("queue_clock"))
        now: datetime = one_row(cur)[0]
        return now


def read_queue(qconn: Connection, queue: Queue, name: str, params: dict[str, Any]) -> list[Entry]:
    """Run a named read on a queue's table and return its rows as entries."""
    with qconn.cursor() as cur:
        cur.execute(table_query(name, queue.table), params)
        return [Entry(*row) for row in cur.fetchall()]


def before(entry: Entry, baseline: Position | None) -> bool:
    """Tell whether an entry stands before a baseline (never, when there is none)."""
    return baseline is not None and entry.position < baseline


def settled_before(entries: Sequence[Entry], baseline: Position) -> list[Entry]:
    """Keep the entries in a terminal status that stand before the baseline."""
    return [e for e in entries if e.status in TERMINAL and before(e, baseline)]


class Adoption:
    """Adopting the service on a running system: INITIAL_WATERMARK at start-up, and the baseline action."""

    def __init__(self, settings: Settings, queue_db: Database, portfolio_db: Database) -> None:
        self.settings = settings
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db

    def prepare(self) -> None:
        """Start the queues with no stored watermark at INITIAL_WATERMARK, once; then warn of every baseline in force.

        The cycle runner calls it once per process, after migrating and before its first cycle.
        """
        if self.settings.initial_watermark is not None:
            self._start_unstarted_queues()
        with self.portfolio_db.transaction() as cur:
            in_force = read_baselines(cur)
        for baseline in in_force.values():
            log.warning("%s", baseline.describe())

    def _start_unstarted_queues(self) -> None:
        """Set the baseline and the first watermark of every queue that has none, in one transaction.

        The migration lock makes processes that start together take turns: the first sets them, and the
        others find them set.
        """
        with (
            self.portfolio_db.connection() as pconn,
            self.queue_db.connection(autocommit=True) as qconn,
            in_transaction(pconn) as cur,
        ):
            cur.execute(query("migration_lock"), {"key": MIGRATION_LOCK_KEY})
            cur.execute(query("unstarted_queues"))
            unstarted = {row[0] for row in cur.fetchall()}
            if not unstarted:
                return
            baseline, start = self._initial_positions(qconn)
            for queue in QUEUES:
                if queue.name in unstarted:
                    self._start_queue(cur, qconn, queue, baseline, start)

    def _initial_positions(self, qconn: Connection) -> tuple[Position, Position]:
        """Return the baseline INITIAL_WATERMARK asks for, and the first watermark: the lower of it and the horizon.

        A time after queue-db's clock is taken as now: only what has settled can have been applied before.
        """
        horizon = read_horizon(qconn, self.settings.lookback_window)
        if horizon.prepared:
            raise DatabaseError(
                QUEUE_DB,
                f"INITIAL_WATERMARK waits while {horizon.prepared} prepared transaction(s) hide when they began; "
                "no entry is applied until they are committed or rolled back",
            )
        now, wanted = queue_clock(qconn), self.settings.initial_watermark
        baseline = (_no_later_than(wanted, now), FIRST_ID)
        return baseline, min(baseline, horizon.position)

    def _start_queue(self, cur: Cursor, qconn: Connection, queue: Queue, baseline: Position, start: Position) -> None:
        """Adopt what settled between the first watermark and the baseline, then store both, in the open transaction."""
        adopted, after, limit = 0, start, self.settings.batch_size
        while True:
            bounds = {"after_ts": after[0], "after_id": after[1], "before_ts": baseline[0], "before_id": baseline[1]}
            rows = read_queue(qconn, queue, "queue_read_before", {**bounds, "limit": limit})
            settled = settled_before(rows, baseline)
            if settled:
                adopted += adopt(cur, queue.name, settled, SETTLED_BEFORE_START, None)
            if len(rows) < limit:
                break
            after = rows[-1].position
        params = {
            "queue": queue.name,
            "ts": baseline[0],
            "id": baseline[1],
            "source": BY_INITIAL_WATERMARK,
            "set_by": None,
        }
        cur.execute(query("set_baseline"), params)
        cur.execute(query("advance_watermark"), {"queue": queue.name, "ts": start[0], "id": start[1]})
        log.warning(
            "INITIAL_WATERMARK: the %s queue had no stored watermark; settled entries updated before %s are not "
            "applied. Its watermark starts at %s, where the watermark rule in force allows: %d entries settled and "
            "committed after that were recorded as adopted, and an entry committed later is applied",
            queue.name,
            baseline[0].isoformat(),
            start[0].isoformat(),
            adopted,
        )

    def record_baseline(self, request: BaselineRequest, actor: str) -> BaselineReport:
        """The baseline action: count (dry run) or record as applied the settled entries before a time, per queue.

        Each queue's rows are walked by queue_id, a batch at a time, each batch in its own transaction. The
        baseline rows and the audit record are written in the transaction that ends a real run.
        """
        with self.queue_db.connection(autocommit=True) as qconn:
            now = queue_clock(qconn)
        if request.before > now:
            raise InputError("before", f"must not be after queue-db's clock ({now.isoformat()})")
        baseline = (request.before, FIRST_ID)
        entries = {queue.name: self._walk(queue, baseline, request, actor) for queue in QUEUES}
        if request.dry_run:
            return BaselineReport(request.before, True, entries)
        with self.portfolio_db.transaction() as cur:
            for queue in QUEUES:
                params = {"queue": queue.name, "ts": baseline[0], "id": baseline[1]}
                cur.execute(query("set_baseline"), {**params, "source": BY_BASELINE_ACTION, "set_by": actor})
            target = {"before": request.before.isoformat(), "queues": [queue.name for queue in QUEUES]}
            audit_id = audit.record(cur, actor, audit.BASELINE, target, request.reason, {"recorded": entries})
            in_force = {queue: b.to_json() for queue, b in read_baselines(cur).items()}
        return BaselineReport(request.before, False, entries, audit_id, in_force)

    def _walk(self, queue: Queue, baseline: Position, request: BaselineRequest, actor: str) -> int:
        """Walk one queue's rows by queue_id; count or record its settled entries before the baseline."""
        total, after, limit = 0, 0, self.settings.batch_size
        with self.queue_db.connection(autocommit=True) as qconn, self.portfolio_db.connection() as pconn:
            while True:
                rows = read_queue(qconn, queue, "queue_read_by_id", {"after_id": after, "limit": limit})
                settled = settled_before(rows, baseline)
                if settled:
                    with in_transaction(pconn) as cur:
                        if request.dry_run:
                            total += count_adoptable(cur, queue.name, settled)
                        else:
                            total += adopt(cur, queue.name, settled, request.reason, actor)
                if len(rows) < limit:
                    return total
                after = rows[-1].queue_id
