"""The running service: settings, both databases, the cycle runner and the poller, and what they report."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from flask import Flask

import logs
import metrics
import migrations
import tiers
from config import Settings
from cycle import CycleRunner
from db import Database, DatabaseError
from poller import Heartbeat, Poller
from queries import query

QUEUE_DB, PORTFOLIO_DB = "queue-db", "user-portfolio-db"
EXTENSION = "consistency"  # the key of the service in app.extensions


@dataclass
class Service:
    """Everything one process of the service holds."""

    settings: Settings
    queue_db: Database
    portfolio_db: Database
    runner: CycleRunner
    poller: Poller

    def liveness(self) -> dict[str, Any]:
        """Tell whether the poller thread runs and, inside a cycle, has made progress recently."""
        stalled = self.poller.heartbeat.stalled_for()
        if not self.poller.is_alive():
            return {"status": "failing", "poller": "stopped"}
        if stalled > self.settings.liveness_timeout:
            return {"status": "failing", "poller": "stuck", "seconds_without_progress": round(stalled, 1)}
        return {"status": "ok", "poller": "running"}

    def readiness(self) -> dict[str, str]:
        """Check each dependency; return 'ok' or the problem for each."""
        checks = {}
        try:
            with self.queue_db.transaction() as cur:
                cur.execute(query("ping"))
            checks[QUEUE_DB] = "ok"
        except DatabaseError as err:
            checks[QUEUE_DB] = f"unreachable: {err.detail}"
        try:
            with self.portfolio_db.transaction() as cur:
                version = migrations.schema_version(cur)
            ok = version == migrations.LATEST_VERSION
            checks[PORTFOLIO_DB] = (
                "ok" if ok else f"state schema at version {version}, needs {migrations.LATEST_VERSION}"
            )
        except DatabaseError as err:
            checks[PORTFOLIO_DB] = f"unreachable: {err.detail}"
        return checks

    def status(self) -> dict[str, Any]:
        """Describe tier values, watermarks, mode, parked count and the last cycle."""
        with self.portfolio_db.transaction() as cur:
            current = tiers.load(cur)
            cur.execute(query("select_watermarks"))
            watermarks = {
                queue: {"updated_at": ts.isoformat(), "queue_id": queue_id, "moved_at": moved.isoformat()}
                for queue, ts, queue_id, moved in cur.fetchall()
            }
            cur.execute(query("count_parked"))
            parked = cur.fetchone()[0]
            cur.execute(query("select_last_cycle"))
            row = cur.fetchone()
        return {
            "tiers": tiers.tiers_json(current),
            "watermarks": watermarks,
            "mode": self.runner.mode or (row[0].get("mode") if row else None),
            "parked_entries": parked,
            "polling_interval": self.settings.polling_interval,
            "last_cycle": row[0] if row else None,
            "this_process": {"poller_alive": self.poller.is_alive(), "last_attempt": self.poller.last_summary},
        }

    def parked(self, limit: int) -> dict[str, Any]:
        """List parked entries, oldest first."""
        with self.portfolio_db.transaction() as cur:
            cur.execute(query("count_parked"))
            total = cur.fetchone()[0]
            cur.execute(query("list_parked"), {"limit": limit})
            columns = [c.name for c in cur.description]
            entries = [dict(zip(columns, map(_plain, row), strict=True)) for row in cur.fetchall()]
        return {"count": total, "entries": entries}

    def update_tiers(self, changes: dict[str, Decimal]) -> dict[str, Any]:
        """Store new tier values, all or nothing, and describe the result."""
        with self.portfolio_db.transaction() as cur:
            updated = tiers.update(cur, changes)
        return tiers.tiers_json(updated)

    def close(self) -> None:
        """Stop the poller and close both pools."""
        self.poller.stop()
        self.queue_db.close()
        self.portfolio_db.close()


def _plain(value: Any) -> Any:
    """Turn a database value into something JSON shows faithfully."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def reported(runner: CycleRunner) -> Callable[[float], dict[str, Any]]:
    """Wrap the cycle so that each one, however it ends, writes one summary line and updates the metrics."""

    def run(lock_wait: float) -> dict[str, Any]:
        """Run one cycle and report it."""
        try:
            summary = runner.run(lock_wait)
        except Exception:
            report({"result": "error", "error": "internal error; see the service log"})
            raise
        if summary["result"] == "ok":
            report(summary, *progress(runner.portfolio_db))
        else:
            report(summary)
        return summary

    return run


def report(summary: dict[str, Any], watermarks: dict[str, Any] | None = None, parked: int | None = None) -> None:
    """Write a cycle's summary line and count it in the metrics."""
    logs.log_cycle(summary, watermarks, parked)
    metrics.observe_cycle(summary, parked)


def progress(portfolio_db: Database) -> tuple[dict[str, Any] | None, int | None]:
    """Read the stored watermarks and the parked count after a cycle; (None, None) if the database is down."""
    try:
        with portfolio_db.transaction() as cur:
            cur.execute(query("select_watermarks"))
            watermarks = {queue: {"updated_at": ts.isoformat(), "queue_id": queue_id} for queue, ts, queue_id, _ in cur}
            cur.execute(query("count_parked"))
            return watermarks, cur.fetchone()[0]
    except DatabaseError:
        return None, None


def service_of(flask_app: Flask) -> Service:
    """Return the service behind a Flask app."""
    return flask_app.extensions[EXTENSION]


def build_service(settings: Settings) -> Service:
    """Wire the databases, the cycle runner and the poller together; nothing connects yet."""
    queue_db = Database(QUEUE_DB, settings.queue_db_uri, settings, metrics.pool_tracker(QUEUE_DB))
    portfolio_db = Database(PORTFOLIO_DB, settings.portfolio_db_uri, settings, metrics.pool_tracker(PORTFOLIO_DB))
    stopping, heartbeat = threading.Event(), Heartbeat()
    runner = CycleRunner(settings, queue_db, portfolio_db, stopping, heartbeat)
    poller = Poller(reported(runner), settings.polling_interval, settings.trigger_wait, stopping, heartbeat)
    return Service(settings, queue_db, portfolio_db, runner, poller)
