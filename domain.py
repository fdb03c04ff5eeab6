"""What the service works on, with no database in sight: the queues, their entries, statuses and outcomes,
the two databases' names, the tier keys and a cycle's result. Every other module takes them from here."""

from __future__ import annotations

import time
import uuid as uuidlib
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

# The names every message, metric label and readiness check gives the two databases.
QUEUE_DB, PORTFOLIO_DB = "queue-db", "user-portfolio-db"
DATABASES = (QUEUE_DB, PORTFOLIO_DB)

# Settled queue statuses, and the status each gives its portfolio transaction.
MIRRORED = {"COMPLETED": "PROCESSED", "FAILED": "FAILED", "CANCELLED": "CANCELLED"}
TERMINAL = tuple(MIRRORED)
PROCESSED = MIRRORED["COMPLETED"]
# Not settled yet. Every other status, an unknown one included, is read as settled: applied or parked.
OPEN = ("PENDING", "PROCESSING")
PARKED = "parked"
# What can become of an entry the service applies.
OUTCOMES = (*TERMINAL, PARKED)

# What a drift check finds, by kind: a settled entry behind the watermark that was never applied; a ledger
# record whose queue row is gone or changed status; a portfolio transaction whose status differs from the
# outcome applied; a PROCESSED transaction the ledger does not record; a ledger record whose queue row now
# carries another transaction (queue-db restored from a backup, a uuid rewritten).
DRIFT_KINDS = ("unapplied_entry", "changed_entry", "changed_transaction", "unrecorded_transaction", "reused_entry")
UNAPPLIED_ENTRY, CHANGED_ENTRY, CHANGED_TRANSACTION, UNRECORDED_TRANSACTION, REUSED_ENTRY = DRIFT_KINDS

# Who set a queue's adoption baseline (consistency.baseline.source): INITIAL_WATERMARK, or the operators' action.
BY_INITIAL_WATERMARK, BY_BASELINE_ACTION = "INITIAL_WATERMARK", "baseline action"
BASELINE_SOURCES = (BY_INITIAL_WATERMARK, BY_BASELINE_ACTION)

# The six tier values: pool (TIERn) and market (TIERn_MV) per tier.
TIER_KEYS = ("TIER1", "TIER1_MV", "TIER2", "TIER2_MV", "TIER3", "TIER3_MV")


class InputError(ValueError):
    """Bad input from a caller, with the field it is in."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# Where an entry sits in the order the service reads a queue: (updated_at, queue_id).
Position = tuple[datetime, int]


@dataclass(frozen=True)
class Queue:
    """A queue table of queue-db and what its completed entries change in a portfolio."""

    name: str
    table: str
    transaction_type: str
    portfolio_columns: str  # "values" or "allocations"


# A queue's name, as requests and answers give it: one of QUEUES' names.
QueueName = Literal["investment", "withdrawal"]
INVESTMENT = Queue("investment", "investment_queue", "INVEST", "values")
WITHDRAWAL = Queue("withdrawal", "withdrawal_queue", "WITHDRAWAL", "allocations")
QUEUES = (INVESTMENT, WITHDRAWAL)


def transaction_id(uuid: str | None) -> str | None:
    """Read a queue uuid as the id of its portfolio transaction, in one spelling; None if it is not a UUID."""
    try:
        return str(uuidlib.UUID(uuid)) if uuid is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Entry:
    """One queue row as the service reads it."""

    queue_id: int
    account_number: str | None
    uuid: str | None
    status: str | None
    updated_at: datetime

    @property
    def position(self) -> Position:
        """Return where the entry sits in (updated_at, queue_id) order."""
        return (self.updated_at, self.queue_id)

    @property
    def transaction(self) -> str | None:
        """Return the portfolio transaction the row carries: with its queue and queue_id, the entry's identity."""
        return transaction_id(self.uuid)


@dataclass(frozen=True)
class Stamp:
    """What the journal records of a cycle name: the cycle, and the tier values in force (a tier_value_history id)."""

    cycle: int
    tier_version: int


# How a cycle ended: it ran, it failed, another process had the turn (or just ran one), or applying is paused.
Outcome = Literal["ok", "error", "skipped", "paused"]
# The rule that bounded the watermarks (docs/concepts/watermarks.md).
Mode = Literal["exact", "lookback"]
# What a cycle counts per queue: entries read, their outcomes, new corrections, queue rows found carrying another
# transaction than the one applied under their queue_id (new entries), reconciled entries and rows swept.
COUNT_KEYS = ("read", *TERMINAL, PARKED, "corrected", "reused", "reconciled", "swept")


@dataclass(frozen=True)
class QueueStart:
    """Where a queue's part of a cycle starts, as stored: watermark, read position, parked entries, sweep due."""

    watermark: Position
    read: Position | None  # how far look-back mode's drain has read; None before its first read
    any_parked: bool
    sweep_due: bool  # no sweep of this queue ended within RECONCILE_INTERVAL, on any process


@dataclass(frozen=True)
class CycleWork:
    """What a cycle that took its turn did: the watermark rule it followed and what became of each queue's entries."""

    mode: Mode
    horizon: datetime
    # Seconds the oldest open queue-db transaction had been open (exact mode); None when there was none.
    oldest_transaction_s: float | None
    prepared_transactions: int
    untracked_sessions: int
    reconciled: bool
    counts: dict[str, dict[str, int]]
    stopped_early: bool
    cycle: int  # the number its journal records name


@dataclass(frozen=True)
class CycleResult:
    """A cycle's result: built once, by the cycle runner, and read by the log line, the metrics and the API."""

    started_at: datetime
    outcome: Outcome
    duration_ms: float
    work: CycleWork | None = None  # also kept when the cycle ran but failed to store its summary
    error: str | None = None

    @classmethod
    def finish(
        cls, started: datetime, clock: float, outcome: Outcome, work: CycleWork | None = None, error: str | None = None
    ) -> CycleResult:
        """Build the result of a cycle that started at `started`, `clock` by time.monotonic(): its one duration."""
        return cls(started, outcome, round((time.monotonic() - clock) * 1000, 1), work, error)

    def to_json(self) -> dict[str, Any]:
        """Return the summary the log line, the status endpoint, the trigger and the stored last cycle show."""
        summary: dict[str, Any] = {"started_at": self.started_at.isoformat(), "result": self.outcome}
        if self.work is not None:
            summary.update(asdict(self.work), horizon=self.work.horizon.isoformat())
        if self.outcome != "skipped":
            summary["error"] = self.error
        summary["duration_ms"] = self.duration_ms
        return summary


@dataclass(frozen=True)
class Pause:
    """An operator's pause of applying, which every process obeys: who paused, why and since when."""

    paused_by: str
    reason: str
    paused_at: datetime

    def to_json(self) -> dict[str, Any]:
        """Return the pause as the status endpoint and the pause actions show it."""
        return {"paused_by": self.paused_by, "reason": self.reason, "paused_at": self.paused_at.isoformat()}


@dataclass(frozen=True)
class Standing:
    """The stored state right after a cycle: each queue's watermark, and how many entries are parked or corrected,
    and how many queue rows were found reused."""

    watermarks: dict[str, dict[str, Any]]
    parked: int
    corrections: int
    reused: int


# Whether the deployment applies: "paused" while an operator's pause is stored, whatever the last cycle's result.
Applying = Literal["running", "paused"]


@dataclass(frozen=True)
class Attempt:
    """A process's attempt at a cycle: its result, and the process that held the lease when that made it skip."""

    result: CycleResult
    lease_holder: str | None = None  # None for a skip when the lease was free but a cycle had started just before

    def to_json(self) -> dict[str, Any]:
        """Return the result's summary; a skipped one also names the lease holder it found."""
        summary = self.result.to_json()
        if self.result.outcome == "skipped":
            summary["lease_holder"] = self.lease_holder
        return summary


def position_json(position: Position) -> dict[str, Any]:
    """Show a position in a queue as the status endpoint does."""
    return {"updated_at": position[0].isoformat(), "queue_id": position[1]}


@dataclass(frozen=True)
class QueueBacklog:
    """What waits in one queue, as read at one time: how far it has been read, and the oldest settled entry past that
    with its age in seconds then (None and 0 when nothing waits)."""

    read_to: Position
    oldest_waiting: Position | None = None
    lag_s: float = 0.0

    def to_json(self, age: float) -> dict[str, Any]:
        """Show it as the status endpoint does, `age` seconds after it was read: what waits has waited that longer."""
        waiting = self.oldest_waiting
        return {
            "read_to": position_json(self.read_to),
            "oldest_waiting": None if waiting is None else position_json(waiting),
            "lag_s": 0.0 if waiting is None else round(self.lag_s + age, 3),
        }


@dataclass(frozen=True)
class Backlog:
    """What waits in each queue, as read from queue-db at one time; or why it could not be read."""

    queues: dict[str, QueueBacklog]
    error: str | None = None

    def to_json(self, age: float) -> dict[str, Any]:
        """Show it as the status endpoint does, `age` seconds after it was read, with the largest lag of the queues."""
        queues = {name: each.to_json(age) for name, each in self.queues.items()}
        lag = max((each["lag_s"] for each in queues.values()), default=0.0)
        return {"lag_s": None if self.error is not None else lag, "error": self.error, "queues": queues}
