"""The eight-step consistency cycle: deltas, both queues in bounded batches, and the watermarks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2.extras import Json

import lease
import metrics
import migrations
import tiers
from actions import read_pause
from config import Settings
from db import Database, DatabaseError, first_line, in_transaction
from domain import COUNT_KEYS, QUEUES, CycleResult, CycleWork, QueueStart, Stamp
from horizon import LOOKBACK, Horizon, HorizonWatch, read_horizon
from lease import Holder, Lease
from poller import Progress
from queries import query
from queue_pass import QueuePass

log = logging.getLogger(__name__)

Connection = psycopg2.extensions.connection


class CycleRunner:
    """Runs the cycle against the two databases, one applier at a time across all processes."""

    def __init__(
        self, settings: Settings, queue_db: Database, portfolio_db: Database, adopt: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db
        self._adopt = adopt  # INITIAL_WATERMARK for the queues that have none stored (adoption.Adoption.prepare)
        self.watch = HorizonWatch(settings.lookback_window, settings.reconcile_interval)
        self.holder: Holder | None = None  # who held the lease when this process last could not take it
        self._prepared = False

    def prepare(self) -> None:
        """Migrate the state schema, seed the tier values and check the queue tables, once."""
        if self._prepared:
            return
        with self.portfolio_db.transaction() as cur:
            migrations.migrate(cur)
            tiers.seed(cur, self.settings.tier_seed)
        if self._adopt is not None:
            self._adopt()
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

    def run(self, lock_wait: float = 0.0, progress: Progress | None = None, fresh_for: float = 0.0) -> CycleResult:
        """Run one cycle if this process gets the lease within lock_wait seconds; return its result.

        It is skipped if another process holds the lease that long, or if a cycle started within fresh_for seconds.
        """
        progress = progress or Progress()
        started, clock = datetime.now(UTC), time.monotonic()
        work = None
        try:
            self.prepare()
            with self.portfolio_db.connection() as pconn, self.queue_db.connection(autocommit=True) as qconn:
                held, self.holder = lease.take(pconn, self.settings.cycle_lease, fresh_for, lock_wait)
                if held is None:
                    return CycleResult.finish(started, clock, "skipped")
                metrics.observe_lease_taken()
                try:
                    work = self._cycle(held, qconn, progress)
                    if work is None:  # paused: nothing read, nothing applied
                        return CycleResult.finish(started, clock, "paused")
                    result = CycleResult.finish(started, clock, "paused" if progress.paused else "ok", work)
                    # Where every process can read it, under the lease: a holder that lost it saves nothing.
                    with held.transaction() as cur:
                        params = {"summary": Json(result.to_json()), "cycle": work.cycle}
                        cur.execute(query("save_last_cycle"), params)
                    return result
                finally:
                    lease.give(held)
        except (DatabaseError, psycopg2.Error, tiers.TiersNotStored) as err:
            return CycleResult.finish(started, clock, "error", work, self._describe(err))

    def _cycle(self, held: Lease, qconn: Connection, progress: Progress) -> CycleWork | None:
        """Steps 1 to 8, plus parked retries and, when due, the reconciliation sweep; None when paused."""
        with in_transaction(held.conn) as cur:  # reads only, right after the lease was taken: no fence needed
            current, tier_version = tiers.load_in_force(cur)
            cur.execute(query("select_cycle_start"), {"reconcile_interval": self.settings.reconcile_interval})
            rows = cur.fetchall()
            progress.paused = read_pause(cur) is not None
        if progress.paused:
            return None
        starts = {row[0]: _queue_start(row) for row in rows}
        stamp = Stamp(rows[0][-1], tier_version)
        horizon = read_horizon(qconn, self.settings.lookback_window)
        self.watch.observe(horizon)
        passes = [
            QueuePass(queue, tiers.factors_for(queue, current), stamp, held, qconn, self.settings.batch_size, progress)
            for queue in QUEUES
        ]
        for each in passes:
            if starts[each.queue.name].any_parked:
                each.retry_parked()
            each.drain(horizon, starts[each.queue.name])
        # Exact mode needs no sweep: its drain reads from the watermark, which no late commit can be behind.
        due = horizon.mode == LOOKBACK and any(start.sweep_due for start in starts.values())
        reconciled = due and not progress.halted()
        if reconciled:
            for each in passes:
                each.reconcile(horizon, starts[each.queue.name], partial(_drain_more, passes, horizon, starts))
        return CycleWork(
            mode=horizon.mode,
            horizon=horizon.bound,
            oldest_transaction_s=horizon.held_for,
            prepared_transactions=horizon.prepared,
            untracked_sessions=horizon.untracked,
            reconciled=reconciled,
            counts={each.queue.name: {key: each.counts[key] for key in COUNT_KEYS} for each in passes},
            stopped_early=progress.halted(),
            cycle=stamp.cycle,
        )

    def _describe(self, err: Exception) -> str:
        """Describe a cycle failure without any credential."""
        return self.portfolio_db.redact(self.queue_db.redact(first_line(err)))


def _drain_more(passes: list[QueuePass], horizon: Horizon, starts: dict[str, QueueStart]) -> None:
    """Between two pages of a sweep, apply what arrived meanwhile in either queue."""
    for each in passes:
        each.drain_more(horizon, starts[each.queue.name])


def _queue_start(row: tuple[Any, ...]) -> QueueStart:
    """Read a select_cycle_start row as the start of its queue's part of the cycle."""
    _, ts, queue_id, read_ts, read_id, any_parked, sweep_due, _ = row
    return QueueStart((ts, queue_id), None if read_ts is None else (read_ts, read_id), any_parked, sweep_due)
