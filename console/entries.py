"""The console's page of one entry: its whole story as the journal tells it (service().journal.story), its records a
page at a time; and what the console's other pages share about entries: reading one from a path, and a problem page."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Response

from actions import QUEUE_ID_MAX, EntryKey
from console import bp, page, page_position, render, service
from domain import QUEUES
from journal import STORY_RECORDS_MAX
from portfolios import labels

RECORDS_PAGE = 100  # journal records of an entry on a page
QUEUE_BY_NAME = {queue.name: queue for queue in QUEUES}


def problem(code: int, title: str, message: str) -> Response:
    """Answer with a page that says what is wrong: a bad request (400), or nothing found (404)."""
    return render("console/problem.html", code, title=title, message=message)


def entry_key(queue: str, queue_id: str) -> EntryKey | None:
    """Read an entry's identity from text, as a path gives it; None unless it is a queue and a queue_id in range."""
    if queue not in QUEUE_BY_NAME or not queue_id.isascii() or not queue_id.isdigit():
        return None
    number = int(queue_id)
    return EntryKey(queue, number) if number <= QUEUE_ID_MAX else None


def bad_entry() -> Response:
    """Refuse a path that names no entry (400)."""
    names = ", ".join(QUEUE_BY_NAME)
    return problem(400, "Not an entry", f"An entry is named by its queue ({names}) and its queue_id, a whole number "
                   f"from 0 to {QUEUE_ID_MAX}.")  # fmt: skip


@dataclass(frozen=True)
class Amount:
    """One tier's amount before and after a completed record, named by its portfolio column, with the factor."""

    column: str
    before: str
    after: str
    factor: str | None


def amounts(queue: str, record: dict[str, Any]) -> list[Amount]:
    """Name a story record's three amounts before and after by the portfolio columns they are; none if it has none."""
    if record.get("after") is None or record.get("before") is None:
        return []
    factors = (record.get("tiers_in_force") or {}).get("factors") or [None, None, None]
    columns = labels(QUEUE_BY_NAME[queue])
    return [Amount(*shown) for shown in zip(columns, record["before"], record["after"], factors, strict=True)]


@bp.get("/entries/<queue>/<queue_id>")
@page
def entry(queue: str, queue_id: str) -> Response:
    """One entry's whole story: its queue row now, where it stands, its transactions, and its journal records."""
    key = entry_key(queue, queue_id)
    if key is None:
        return bad_entry()
    try:
        start = page_position("start", STORY_RECORDS_MAX) or 0
    except ValueError as err:
        return problem(400, "Not a page", f"{err}.")
    story = service().journal.story(QUEUE_BY_NAME[key.queue], key.queue_id)
    if story is None:
        return problem(404, "No such entry", f"No {key.queue} entry {key.queue_id} is known to the queue or to the "
                       "journal.")  # fmt: skip
    records = story["records"][start : start + RECORDS_PAGE]
    return render(
        "console/entry.html",
        story=story,
        records=[(record, amounts(key.queue, record)) for record in records],
        start=start,
        following=start + RECORDS_PAGE if len(story["records"]) > start + RECORDS_PAGE else None,
        records_max=STORY_RECORDS_MAX,
        back="entry",
    )
