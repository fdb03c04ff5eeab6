"""One queue's part of a cycle: the parked retry, the drain past the watermark and the reconciliation sweep."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from functools import partial
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions

import metrics
from actions import read_pause
from adoption import baseline_of, before
from apply import apply_batch_table, apply_each_entry, copy_batch, load_copied, load_entries, park
from db import pg_array
from domain import OPEN, TERMINAL, Entry, Position, Queue, QueueStart, Stamp
from horizon import EXACT, Horizon
from lease import Lease
from poller import Progress
from queries import query, table_query

log = logging.getLogger(__name__)

Connection = psycopg2.extensions.connection
Cursor = psycopg2.extensions.cursor
Key = TypeVar("Key")
Page = Callable[[Key], tuple[int, Key | None]]  # reads and applies the page after a key; its size and last key
# Where the parked retry starts: before every entry.
START: Position = (datetime(1970, 1, 1, tzinfo=UTC), 0)


@dataclass
class QueuePass:
    """Applies one queue's entries in a cycle, batch by batch, on the cycle's two connections.

    Every transaction on user-portfolio-db is one of the lease's: it renews the lease or fails before writing.
    """

    queue: Queue
    factors: tuple[Fraction, ...]
    stamp: Stamp
    lease: Lease
    qconn: Connection
    batch_size: int
    progress: Progress
    counts: Counter[str] = field(default_factory=Counter)
    read_to: Position | None = None  # how far the drain has read, in look-back mode

    def retry_parked(self) -> None:
        """Try the parked entries again, as their queue rows stand now."""
        self._pages(self._retry_page, START)

    def drain(self, horizon: Horizon, start: QueueStart) -> None:
        """Steps 2-4 or 5-7 and 8: apply what changed since the watermark (look-back: the read position); move it.

        Only the lease holder moves either, so the ones read at the start hold. In look-back mode only the sweep
        moves the watermark."""
        self.read_to = start.read
        begin = start.watermark if horizon.mode == EXACT or start.read is None else max(start.watermark, start.read)
        self._pages(lambda after: self._drain_page(after, horizon), begin)

    def drain_more(self, horizon: Horizon, start: QueueStart) -> None:
        """Look-back mode, between two pages of a sweep: apply what arrived since this pass last read."""
        self._pages(lambda after: self._drain_page(after, horizon), self.read_to or start.watermark)

    def reconcile(self, horizon: Horizon, start: QueueStart, between: Callable[[], None]) -> None:
        """Sweep: apply the settled entries from the watermark up to the read position that have no record.

        They committed after the drain read past them. The watermark then moves to where, by LOOKBACK_WINDOW, every
        commit is in. Entries before the queue's adoption baseline are left alone: whatever ran before applied them.
        `between` drains after each full page, so that a long sweep holds no new entry back.
        """
        until = self.read_to or start.watermark
        with self.lease.transaction() as cur:
            baseline = baseline_of(cur, self.queue.name)
        swept = self._pages(lambda after: self._sweep_page(after, until, baseline), start.watermark, between)
        if swept:
            with self.lease.transaction() as cur:
                self._move(cur, "advance_watermark", min(until, horizon.position))
                cur.execute(query("mark_swept"), {"queue": self.queue.name})

    def _pages(self, page: Page[Key], start: Key, between: Callable[[], None] = lambda: None) -> bool:
        """Keyset pagination: run `page` from `start`, then from where each full page ended (`between` after each),
        until stopped or paused. Returns whether it went to the end."""
        after = start
        while not self.progress.halted():
            size, last = page(after)
            self.progress.beat()
            if last is None or size < self.batch_size:
                return True
            after = last
            between()
            with self.lease.transaction() as cur:  # between full batches: a long drain renews and stops too
                self.progress.paused = read_pause(cur) is not None
        return False

    def _drain_page(self, after: Position, horizon: Horizon) -> tuple[int, Position | None]:
        """Copy the next batch out of queue-db, apply it and move the watermark; return its size and end."""
        with self.qconn.cursor() as qcur:
            data = copy_batch(qcur, self.queue, after, self.batch_size)
        if not data:
            return 0, None  # nothing new, so no transaction to load and apply nothing
        with self.lease.transaction() as cur:
            read, last = load_copied(cur, data)
            if last is None:
                return 0, None
            params = {"after_ts": after[0], "after_id": after[1], "last_ts": last[0], "last_id": last[1]}
            reread = partial(read_entries, self.qconn, self.queue, "queue_read_range", params)
            counts = self._apply_or_isolate(cur, reread)
            if horizon.mode == EXACT:
                self._move(cur, "advance_watermark", min(last, horizon.position))
            else:
                self._move(cur, "advance_read_position", last)
                self.read_to = last
        self.counts += counts
        self.counts["read"] += read
        metrics.observe_batch(last[0], sum(counts.values()))
        return read, last

    def _move(self, cur: Cursor, name: str, position: Position) -> None:
        """Move this queue's watermark (advance_watermark) or read position (advance_read_position) forward."""
        cur.execute(query(name), {"queue": self.queue.name, "ts": position[0], "id": position[1]})

    def _retry_page(self, after: Position) -> tuple[int, Position | None]:
        """Try the next batch of parked entries again; return its size and the last one's position."""
        with self.lease.transaction() as cur:
            params = {"queue": self.queue.name, "after_ts": after[0], "after_id": after[1], "limit": self.batch_size}
            cur.execute(query("select_parked_batch"), params)
            parked = [Entry(*row) for row in cur.fetchall()]
        if not parked:
            return 0, None
        ids = pg_array(e.queue_id for e in parked)
        current = read_entries(self.qconn, self.queue, "queue_select_by_id", {"queue_ids": ids})
        self._settle(parked, current)
        return len(parked), parked[-1].position

    def _settle(self, parked: list[Entry], current: list[Entry]) -> None:
        """Apply parked entries whose rows are still settled; release those reopened, note those gone."""
        # An unknown status is not open: applying parks it again, with the status in the reason.
        settled = sorted((e for e in current if e.status not in OPEN), key=lambda e: e.position)
        reopened = [e.queue_id for e in current if e.status in OPEN]
        found = {e.queue_id for e in current}
        gone = [(e, "the queue entry no longer exists") for e in parked if e.queue_id not in found]
        if reopened or gone:
            with self.lease.transaction() as cur:
                if reopened:
                    # Their next change moves updated_at past the watermark, so the cycle will read them again.
                    params = {"queue": self.queue.name, "queue_ids": pg_array(reopened), "cycle": self.stamp.cycle}
                    cur.execute(query("release_reopened"), params)
                if gone:
                    park(cur, self.queue, gone, self.stamp)
        if settled:
            self._apply_entries(settled, retrying=True)

    def _sweep_page(self, after: Position, until: Position, baseline: Position | None) -> tuple[int, Position | None]:
        """Apply the settled entries of the next batch up to `until` that have no applied record, from the baseline."""
        params = {"after_ts": after[0], "after_id": after[1], "until_ts": until[0], "until_id": until[1]}
        batch = read_entries(self.qconn, self.queue, "queue_read_settled_range", {**params, "limit": self.batch_size})
        if not batch:
            return 0, None
        self.counts["swept"] += len(batch)
        with self.lease.transaction() as cur:
            missing = unapplied(cur, self.queue, batch)
        # Entries before the baseline are left out here, not in the read: each page still reads batch_size rows.
        found = [e for e in batch if e.queue_id in missing and not before(e, baseline)]  # in position order
        if found:
            self.counts["reconciled"] += len(found)
            self._apply_entries(found)
        return len(batch), batch[-1].position

    def _apply_entries(self, entries: Sequence[Entry], retrying: bool = False) -> None:
        """Apply entries read in Python, in one transaction."""
        with self.lease.transaction() as cur:
            load_entries(cur, entries)
            ids = pg_array(e.queue_id for e in entries)
            self.counts += self._apply_or_isolate(cur, lambda: entries, retrying, ids)

    def _apply_or_isolate(
        self, cur: Cursor, entries: Callable[[], Sequence[Entry]], retrying: bool = False, ids: str | None = None
    ) -> Counter[str]:
        """Apply the loaded batch set-based; if the database rejects it, apply its entries one at a time."""
        cur.execute(query("savepoint_batch"))
        try:
            counts = apply_batch_table(cur, self.queue, self.factors, self.stamp, retrying, ids)
            cur.execute(query("release_batch"))
        except (psycopg2.IntegrityError, psycopg2.DataError) as err:
            cur.execute(query("rollback_to_batch"))
            detail = err.diag.message_primary
            log.warning("a %s batch was rejected (%s); applying it entry by entry", self.queue.name, detail)
            counts = apply_each_entry(cur, self.queue, entries(), self.factors, self.stamp, retrying)
        note_applied(cur, self.queue, counts)
        return counts


def unapplied(cur: Cursor, queue: Queue, batch: Sequence[Entry]) -> set[int]:
    """Return the queue_ids of a batch's entries that are neither applied, parked nor resolved, probing the ledger
    entry by entry."""
    params = {"queue": queue.name, "queue_ids": pg_array(e.queue_id for e in batch)}
    cur.execute(query("probe_by_index"))
    cur.execute(query("filter_unapplied"), {**params, "uuids": pg_array(e.uuid for e in batch)})
    return {row[0] for row in cur.fetchall()}


def note_applied(cur: Cursor, queue: Queue, counts: Counter[str]) -> None:
    """Add a batch's applied entries to this minute's count, in its transaction: what the console's chart shows."""
    applied = sum(counts[outcome] for outcome in TERMINAL)
    if applied:
        cur.execute(query("note_applied"), {"queue": queue.name, "entries": applied})


def read_entries(qconn: Connection, queue: Queue, name: str, params: dict[str, Any]) -> list[Entry]:
    """Run a named read on a queue's table and return its rows as entries."""
    with qconn.cursor() as cur:
        cur.execute(table_query(name, queue.table), params)
        return [Entry(*row) for row in cur.fetchall()]
