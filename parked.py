"""The parked entries an operator looks for: filtered as the bulk actions filter them, oldest first, a bounded page
at a time."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from actions import FILTER_TEXT_MAX, QUEUE_ID_MAX, QUEUE_NAMES, Parked
from db import Database, pg_array
from domain import InputError
from queries import query

# Entries a page reads at most per queue when it filters by reason, which no index answers: a page then holds the
# matches among them, and says where the reading stopped, for the next page to go on from there.
PARKED_SCAN = 5000
# A position as a page shows it: parked_at in UTC to the microsecond, the queue and the queue_id.
_POSITION = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6})Z~([a-z]+)~(\d{1,10})")


@dataclass(frozen=True)
class ParkedFilter:
    """Which parked entries a listing shows: of a queue, of an account, whose reason contains a text; None: any."""

    queue: str | None = None
    account: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        """Refuse what no parked entry could match: an empty or overlong text, or an unknown queue."""
        for name, value in vars(self).items():
            if value is not None and (not value.strip() or len(value) > FILTER_TEXT_MAX):
                raise InputError(name, f"must be a non-empty string of at most {FILTER_TEXT_MAX} characters")
        if self.queue is not None and self.queue not in QUEUE_NAMES:
            raise InputError("queue", f"must be one of {', '.join(QUEUE_NAMES)}")

    def shown(self) -> dict[str, str]:
        """Return the filter as given, for the answer."""
        return {name: value for name, value in vars(self).items() if value is not None}


@dataclass(frozen=True)
class ParkedPosition:
    """A place in the parked entries' (parked_at, queue, queue_id) order, which never changes while an entry stays
    parked: a page starts after it."""

    parked_at: datetime
    queue: str
    queue_id: int

    @classmethod
    def parse(cls, token: str, field: str = "after") -> ParkedPosition:
        """Read a position as token() shows it; raise InputError naming `field` for anything else."""
        match = _POSITION.fullmatch(token)
        try:
            if match is None or match[2] not in QUEUE_NAMES or int(match[3]) > QUEUE_ID_MAX:
                raise ValueError(token)
            return cls(datetime.fromisoformat(match[1]).replace(tzinfo=UTC), match[2], int(match[3]))
        except ValueError as err:
            raise InputError(field, "must be a position that a page of parked entries gave as next_after") from err

    @classmethod
    def of(cls, entry: Parked) -> ParkedPosition:
        """Return where a parked entry sits."""
        return cls(entry.parked_at, entry.queue, entry.queue_id)

    def token(self) -> str:
        """Show the position as text that stays the same in a URL: 2026-12-01T22:05:26.115042Z~investment~17."""
        return f"{self.parked_at.astimezone(UTC):%Y-%m-%dT%H:%M:%S.%f}Z~{self.queue}~{self.queue_id}"


def read_parked(
    portfolio_db: Database, where: ParkedFilter, limit: int, after: ParkedPosition | None
) -> dict[str, Any]:
    """List a page of the parked entries a filter matches, oldest first after a position, and where the next starts.

    At most `limit` entries. Each queue is read along an index from the position on: at most limit + 1 entries, or
    PARKED_SCAN with a reason to match. A page that stopped reading short of the limit (too few entries matched the
    reason) ends where it stopped; `more` is then true, and the next page goes on from there.
    """
    params = {
        "queues": pg_array([where.queue] if where.queue else QUEUE_NAMES),
        "account": where.account,
        "reason": where.reason,
        "scan": limit + 1 if where.reason is None else max(PARKED_SCAN, limit + 1),
        "limit": limit + 1,
        "after_at": None if after is None else after.parked_at,
        "after_queue": None if after is None else after.queue,
        "after_id": None if after is None else after.queue_id,
    }
    with portfolio_db.transaction() as cur:
        cur.execute(query("page_plan"))
        cur.execute(query("list_parked_page"), params)
        rows = cur.fetchall()
    stop = None if rows[0][0] is None else ParkedPosition(*rows[0][:3])
    found = [Parked(*row[3:]) for row in rows if row[3] is not None]
    if len(found) > limit:
        found, stop = found[:limit], ParkedPosition.of(found[limit - 1])
    return {
        "filter": where.shown(),
        "entries": [entry.to_json() for entry in found],
        "more": stop is not None,
        "next_after": None if stop is None else stop.token(),
    }
