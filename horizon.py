"""How far the watermarks may move in a cycle, and the warnings an operator gets when that changes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg2.extensions

from db import one_row
from domain import Mode, Position
from queries import query

log = logging.getLogger(__name__)

EXACT: Mode = "exact"
LOOKBACK: Mode = "lookback"
# Covers the instant between a writer's transaction start and its showing in pg_stat_activity.
HORIZON_MARGIN = timedelta(seconds=1)
# An open queue-db transaction older than this holds the watermarks back long enough to say so.
HELD_WARNING_SECONDS = 60.0
MAX_QUEUE_ID = 2**31 - 1
ONE_MICROSECOND = timedelta(microseconds=1)
# Where the stored watermark stays while queue-db has prepared transactions: it never moves back.
HOLD = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Horizon:
    """How far the stored watermark may move: every entry updated before `bound` is committed."""

    mode: Mode
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


def read_horizon(queue_conn: psycopg2.extensions.connection, lookback: float) -> Horizon:
    """Bound the watermark by the oldest open queue-db transaction, or by the look-back window.

    A session whose transaction start is hidden (track_activities off) turns this cycle to the look-back
    rule; a prepared transaction, whose start no view shows, holds the watermark where it is.
    """
    with queue_conn.cursor() as cur:
        cur.execute(query("queue_horizon"))
        exact, oldest, untracked, prepared, oldest_prepared, now = one_row(cur)
    if exact and not untracked:
        # A prepared transaction began before it was prepared: its age is at least the time since then.
        holder = min((t for t in (oldest, oldest_prepared) if t is not None), default=None)
        held_for = round((now - holder).total_seconds(), 1) if holder and holder < now else None
        bound = HOLD if prepared else min(oldest or now, now) - HORIZON_MARGIN
        return Horizon(EXACT, bound, held_for, prepared)
    return Horizon(LOOKBACK, now - timedelta(seconds=lookback), untracked=untracked if exact else 0)


class HorizonWatch:
    """Follows the horizon from cycle to cycle, and says when its rule changes."""

    def __init__(self, lookback_window: float, reconcile_interval: float) -> None:
        self.lookback_window = lookback_window
        self.reconcile_interval = reconcile_interval
        self.mode: Mode | None = None
        self._held = False
        self._holding_prepared = False

    def observe(self, horizon: Horizon) -> None:
        """Log what changed since the last cycle: the mode, a long-open transaction, prepared transactions."""
        self._note_mode(horizon)
        self._note_held(horizon.held_for)
        self._note_prepared(horizon.prepared)

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
                self.lookback_window,
            )
        else:
            log.warning(
                "watermark mode: lookback; this role cannot see other sessions' xact_start "
                "(grant pg_read_all_stats for exact mode); using a %gs look-back window and a "
                "reconciliation sweep every %gs",
                self.lookback_window,
                self.reconcile_interval,
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
