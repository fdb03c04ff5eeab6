"""The console's audit trail: every operator action, newest first, filtered by action and by actor, a page at a
time; each filter is read along an index of its own (sql/migrations/0015_audit_filters.sql)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flask import Response, request

import audit
from console import bp, page, page_position, refused, render, service

PAGE_SIZE = 50  # actions on a page
ACTOR_MAX = 500  # characters of an actor to look for: a token's name
SHOWN_MAX = 600  # characters of an action's target or detail shown in full; the rest is cut, and says so


@dataclass(frozen=True)
class Shown:
    """An action's target or detail as the page shows it: JSON text, cut to SHOWN_MAX characters."""

    text: str
    cut: bool


@dataclass(frozen=True)
class Link:
    """Where an action's target can be looked at in the console: the path and what it is."""

    href: str
    label: str


def shown(value: Any) -> Shown:
    """Show a stored JSON value as text for people to read, cut when long; the template escapes it."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return Shown(text[:SHOWN_MAX], len(text) > SHOWN_MAX)


def target_link(target: dict[str, Any]) -> Link | None:
    """Return the console page of what an action touched, when it is one entry or one drift check."""
    queue, queue_id, check = target.get("queue"), target.get("queue_id"), target.get("drift_check")
    if isinstance(queue, str) and isinstance(queue_id, int) and queue.isalpha():
        return Link(f"/console/entries/{queue}/{queue_id}", f"the story of {queue} entry {queue_id}")
    if isinstance(check, int):
        return Link(f"/console/drift-checks/{check}", f"drift check {check}")
    return None


def filters() -> tuple[str | None, str | None, list[str]]:
    """Read the filters of the page from the query: the action and the actor (None: any), and their problems."""
    action = request.args.get("action", "").strip() or None
    actor = request.args.get("actor", "").strip() or None
    problems = []
    if action is not None and action not in audit.ACTIONS:
        problems.append(f"There is no action {action!r}: choose one of the list.")
    if actor is not None and len(actor) > ACTOR_MAX:
        problems.append(f"An actor is a token's name, of {ACTOR_MAX} characters at most.")
    return action, actor, problems


@bp.get("/audit")
@page
def audit_trail() -> Response:
    """The audit trail, newest first, filtered by action and by actor, a page at a time."""
    action, actor, problems = filters()
    try:
        before = page_position()
    except ValueError as err:
        return refused(400, str(err))
    if problems:
        empty: dict[str, Any] = {"entries": [], "next_before": None}
        return render("console/audit.html", 400, trail=empty, rows=[], action=action, actor=actor, before=before,
                      actions=audit.ACTIONS, problems=problems)  # fmt: skip
    trail = service().audit.page(PAGE_SIZE, before, action, actor)
    rows = [(entry, shown(entry["target"]), shown(entry["detail"]), target_link(entry["target"]))
            for entry in trail["entries"]]  # fmt: skip
    return render("console/audit.html", trail=trail, rows=rows, action=action, actor=actor, before=before,
                  actions=audit.ACTIONS, problems=[])  # fmt: skip
