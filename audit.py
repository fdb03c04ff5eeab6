"""The audit trail: every change an operator makes through the API, who made it, when, what it touched and why."""

from __future__ import annotations

from typing import Any, Literal, get_args

import psycopg2.extensions
from psycopg2.extras import Json

from db import Database, fetch_page, one_row
from queries import query

# What an operator can do, as the trail names it.
UPDATE_TIER_VALUES = "update_tier_values"
RETRY = "retry"
RESOLVE = "resolve"
PAUSE = "pause"
RESUME = "resume"
START_DRIFT_CHECK = "start_drift_check"
BASELINE = "baseline"
Action = Literal["update_tier_values", "retry", "resolve", "pause", "resume", "start_drift_check", "baseline"]
ACTIONS: tuple[str, ...] = get_args(Action)


def record(
    cur: psycopg2.extensions.cursor,
    actor: str,
    action: str,
    target: dict[str, Any],
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    """Record an action in the caller's transaction, so that it is kept exactly when its change is; return its id."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    params = {"actor": actor, "action": action, "target": Json(target), "reason": reason, "detail": Json(detail or {})}
    cur.execute(query("insert_audit"), params)
    entry_id: int = one_row(cur)[0]
    return entry_id


class AuditTrail:
    """Reads the audit trail for the API and the console."""

    def __init__(self, portfolio_db: Database) -> None:
        self._portfolio_db = portfolio_db

    def page(
        self, limit: int, before: int | None, action: str | None = None, actor: str | None = None
    ) -> dict[str, Any]:
        """List operator actions of an action and of an actor (None: any), newest first, `limit` at a time, below the
        id `before` when given.

        Each filter walks its index (sql/migrations/0015_audit_filters.sql) down from `before`, however long the trail.
        """
        with self._portfolio_db.transaction() as cur:
            cur.execute(query("page_plan"))  # along the index even where the statistics are stale
            return fetch_page(cur, "list_audit_matching", {"before": before, "action": action, "actor": actor}, limit)
