"""What the console's overview draws of the deployment's recent work: the entries applied per minute, per queue,
over the last hour, and the summaries of the last cycles that ran. Both are kept by the cycles themselves
(queue_pass notes each batch's entries in its own transaction; cycle.py keeps each summary), bounded: a day of
minutes, a hundred cycles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from db import Database
from domain import QUEUES
from queries import query

HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Activity:
    """The last hour's entries applied, minute by minute per queue (oldest first), and the last cycles."""

    since: datetime
    per_minute: dict[str, list[int]]
    cycles: list[dict[str, Any]]


def read_activity(portfolio_db: Database, cycles: int = 10) -> Activity:
    """Read the last hour's entries per minute, 60 counts per queue (0 for a minute without any), and the newest
    cycles' summaries."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    since = now - HOUR + timedelta(minutes=1)
    per_minute = {queue.name: [0] * 60 for queue in QUEUES}
    with portfolio_db.transaction() as cur:
        cur.execute(query("applied_per_minute"), {"since": since})
        for minute, queue, entries in cur.fetchall():
            slot = int((minute - since).total_seconds() // 60)
            if queue in per_minute and 0 <= slot < 60:
                per_minute[queue][slot] = entries
        cur.execute(query("recent_cycles"), {"limit": cycles})
        summaries = [row[0] for row in cur.fetchall()]
    return Activity(since, per_minute, summaries)
