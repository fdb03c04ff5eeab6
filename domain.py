"""What the service works on, with no database in sight: the queues, their entries, statuses and outcomes,
the two databases' names and the tier keys. Every other module takes them from here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# The names every message, metric label and readiness check gives the two databases.
QUEUE_DB, PORTFOLIO_DB = "queue-db", "user-portfolio-db"
DATABASES = (QUEUE_DB, PORTFOLIO_DB)

# Settled queue statuses, and the status each gives its portfolio transaction.
MIRRORED = {"COMPLETED": "PROCESSED", "FAILED": "FAILED", "CANCELLED": "CANCELLED"}
TERMINAL = tuple(MIRRORED)
# Not settled yet. Every other status, an unknown one included, is read as settled: applied or parked.
OPEN = ("PENDING", "PROCESSING")
PARKED = "parked"
# What can become of an entry the service applies.
OUTCOMES = (*TERMINAL, PARKED)

# The six tier values: pool (TIERn) and market (TIERn_MV) per tier.
TIER_KEYS = ("TIER1", "TIER1_MV", "TIER2", "TIER2_MV", "TIER3", "TIER3_MV")

# Where an entry sits in the order the service reads a queue: (updated_at, queue_id).
Position = tuple[datetime, int]


@dataclass(frozen=True)
class Queue:
    """A queue table of queue-db and what its completed entries change in a portfolio."""

    name: str
    table: str
    transaction_type: str
    portfolio_columns: str  # "values" or "allocations"


INVESTMENT = Queue("investment", "investment_queue", "INVEST", "values")
WITHDRAWAL = Queue("withdrawal", "withdrawal_queue", "WITHDRAWAL", "allocations")
QUEUES = (INVESTMENT, WITHDRAWAL)


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
