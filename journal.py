"""The journal for the API: one account's records, newest first, and one entry's whole story."""

from __future__ import annotations

import psycopg2.extensions

from config import Settings
from db import Database
from queries import query

# What a journal record tells of its entry.
APPLIED = "applied"  # the cycle applied it: its outcome, and the tier amounts before and after
PARKED = "parked"  # it could not apply: a parking started, or its reason changed
RELEASED = "released"  # its queue row was open again, so it left the parked list
GONE = "gone"  # its queue row was deleted while it was parked
CORRECTED = "corrected"  # the queue changed its status after it was applied
AGREES_AGAIN = "agrees_again"  # the queue's status is back to the one applied
RETRIED = "retried"  # an operator asked for a retry
RESOLVED = "resolved"  # an operator dismissed it: it is never applied
ADOPTED = "adopted"  # recorded as applied by the baseline action, without moving money
KINDS = (APPLIED, PARKED, RELEASED, GONE, CORRECTED, AGREES_AGAIN, RETRIED, RESOLVED, ADOPTED)


def record(
    cur: psycopg2.extensions.cursor,
    queue: str,
    queue_id: int,
    kind: str,
    *,
    account: str | None = None,
    status: str | None = None,
    reason: str | None = None,
    attempts: int | None = None,
    actor: str | None = None,
    cycle: int | None = None,
) -> None:
    """Write one record against an entry, in the caller's transaction."""
    if kind not in KINDS:
        raise ValueError(f"unknown journal kind {kind!r}")
    params = {"queue": queue, "queue_id": queue_id, "kind": kind, "account": account, "status": status}
    cur.execute(
        query("insert_journal_record"),
        {**params, "reason": reason, "attempts": attempts, "actor": actor, "cycle": cycle},
    )


class Journal:
    """Reads the journal for the API."""

    def __init__(self, settings: Settings, queue_db: Database, portfolio_db: Database) -> None:
        self.settings = settings
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db
