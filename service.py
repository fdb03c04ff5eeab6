"""The running service: settings, both databases, the cycle runner, the stored state and the poller, and what
they report."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from flask import Flask

import audit
import lease
import logs
import metrics
import migrations
import tiers
from actions import Actions
from adoption import Adoption, baseline_row
from config import Settings
from cycle import CycleRunner
from db import Database, DatabaseError, fetch_page, json_rows, one_row
from domain import PORTFOLIO_DB, QUEUE_DB, CycleResult, Pause, Standing
from drift import DriftChecks
from horizon import HorizonWatch
from journal import Journal
from listener import Listener
from poller import Poller, Progress
from queries import query

log = logging.getLogger(__name__)

EXTENSION = "consistency"  # the key of the service in app.extensions
# How old the state served by the status endpoint may be; every cycle this process runs refreshes it.
STATE_MAX_AGE = 1.0
# What a caller is told of an unexpected error; the traceback goes to the log.
INTERNAL_ERROR = "internal error; see the service log"
# How long /ready waits for the databases' answers: well within the readiness probe's timeout (k8s/base: 5 s).
READY_WAIT = 1.5


class StateCache:
    """The stored state served by the status endpoint, read again when older than STATE_MAX_AGE."""

    def __init__(self, portfolio_db: Database, watch: HorizonWatch) -> None:
        self._portfolio_db = portfolio_db
        self._watch = watch  # this process's mode, which it may know before any cycle is stored
        self._state: dict[str, Any] | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any]:
        """Return the stored state as of at most STATE_MAX_AGE seconds ago, reading it again only when older.

        One request at a time reads it; meanwhile the others get the kept state, if there is one, rather
        than queue behind a read that may wait for a connect timeout.
        """
        kept = self._state
        if kept is not None:
            if time.monotonic() - self._read_at <= STATE_MAX_AGE or not self._lock.acquire(blocking=False):
                return kept
        else:
            self._lock.acquire()
        try:
            if self._state is not None and time.monotonic() - self._read_at <= STATE_MAX_AGE:
                return self._state  # read by the request this one waited for
            return self.refresh()
        finally:
            self._lock.release()

    def after_cycle(self) -> Standing:
        """Read the state a cycle left, for every request after it, and return its standing."""
        with self._lock:
            state = self.refresh()
        return Standing(state["watermarks"], state["parked_entries"], state["corrections"], state["reused_entries"])

    def forget(self) -> None:
        """Have the next status request read the state again."""
        with self._lock:
            self._state = None

    def refresh(self) -> dict[str, Any]:
        """Read the stored state in one transaction and keep it."""
        with self._portfolio_db.transaction() as cur:
            current = tiers.load(cur)
            cur.execute(query("select_watermarks_and_baselines"))
            rows = cur.fetchall()
            watermarks = {
                queue: {"updated_at": ts.isoformat(), "queue_id": queue_id, "moved_at": moved.isoformat()}
                for queue, ts, queue_id, moved, *_ in rows
            }
            baselines = {row[0]: baseline_row(row[0], row[4:]).to_json() for row in rows if row[4] is not None}
            cur.execute(query("select_counts_and_pause"))
            parked, corrections, reused, *paused = one_row(cur)
            cur.execute(query("select_last_cycle"))
            row = cur.fetchone()
        pause = None if paused[0] is None else Pause(*paused)
        metrics.observe_pause(pause)
        self._state = {
            "tiers": tiers.tiers_json(current),
            "watermarks": watermarks,
            "baseline": baselines,
            "mode": self._watch.mode or (row[0].get("mode") if row else None),
            "parked_entries": parked,
            "corrections": corrections,
            "reused_entries": reused,
            "pause": None if pause is None else pause.to_json(),
            "last_cycle": row[0] if row else None,
        }
        self._read_at = time.monotonic()
        return self._state


class BoundedChecks:
    """Runs named checks on threads of their own, one at a time per name, and waits for them a bounded time.

    A check still running when the next request comes is waited for again, not started twice: a database that
    does not answer holds one thread per check until the connection's own bounds end it, not one per request.
    """

    def __init__(self) -> None:
        self._running: dict[str, _Check] = {}
        self._lock = threading.Lock()

    def run(self, checks: dict[str, Callable[[], str]], wait: float) -> dict[str, str]:
        """Start each check, or join the one running, and return each answer, or that none came within `wait`."""
        deadline = time.monotonic() + wait
        with self._lock:
            for name, check in checks.items():
                if name not in self._running or self._running[name].done.is_set():
                    self._running[name] = _Check(name, check)
            running = {name: self._running[name] for name in checks}
        answers = {}
        for name, each in running.items():
            answered = each.done.wait(max(0.0, deadline - time.monotonic()))
            answers[name] = each.answer if answered else f"unreachable: no answer for {each.age():.1f}s"
        return answers


class _Check:
    """One run of a check, on a daemon thread."""

    def __init__(self, name: str, check: Callable[[], str]) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.answer = INTERNAL_ERROR
        threading.Thread(target=self._run, args=(check,), name=f"check-{name}", daemon=True).start()

    def age(self) -> float:
        """Seconds since the check started."""
        return time.monotonic() - self.started

    def _run(self, check: Callable[[], str]) -> None:
        """Run the check and keep its answer; an unexpected error is logged and answered as such."""
        try:
            self.answer = check()
        except Exception:
            log.exception("a readiness check failed")
        finally:
            self.done.set()


def run_and_report(
    runner: CycleRunner, cache: StateCache, lock_wait: float, progress: Progress, fresh_for: float
) -> CycleResult:
    """Run one cycle, read the state it left, and write its summary line and metrics: whatever happens.

    The one place that owns unexpected errors of a cycle: they are logged with their traceback and
    reported as a failed cycle, and the poller goes on.
    """
    started, clock = datetime.now(UTC), time.monotonic()
    try:
        result = runner.run(lock_wait, progress, fresh_for)
    except Exception:
        log.exception("unexpected error in the consistency cycle")
        result = CycleResult.finish(started, clock, "error", error=INTERNAL_ERROR)
        report(result)
        return result
    standing = None
    try:
        standing = cache.after_cycle()
    except DatabaseError as err:  # the summary line and the metrics still tell of the cycle
        log.warning("could not read the state after a cycle: %s", err)
    except Exception:
        log.exception("could not read the state after a cycle")
    report(result, standing if result.outcome == "ok" else None)
    return result


@dataclass
class Service:
    """Everything one process of the service holds, and what the HTTP layer asks of it."""

    settings: Settings
    queue_db: Database
    portfolio_db: Database
    runner: CycleRunner
    cache: StateCache
    poller: Poller
    audit: audit.AuditTrail
    journal: Journal
    actions: Actions
    drift: DriftChecks
    adoption: Adoption
    checks: BoundedChecks = field(default_factory=BoundedChecks)  # what /ready runs, each within READY_WAIT

    def start(self) -> None:
        """Start the poller (and the listener), the first cycle at once, and the drift checks' thread."""
        self.poller.start()
        self.drift.start()

    def liveness(self) -> dict[str, Any]:
        """Tell whether the poller runs and progresses, and whether a process of this replica stalls the lease."""
        stalled = self.poller.progress.stalled_for()
        if not self.poller.is_alive():
            return {"status": "failing", "poller": "stopped"}
        if stalled > self.settings.liveness_timeout:
            return {"status": "failing", "poller": "stuck", "seconds_without_progress": round(stalled, 1)}
        # This process's own lease, by its own clock, whether or not its database answers; then another process
        # of this replica, as the poller's last attempt to take the lease found it.
        own = lease.Holder(lease.this_process(), lease.HELD.unrenewed_for())
        for holder in (own, self.runner.holder):
            if (
                holder is not None
                and holder.name.startswith(lease.this_replica())
                and holder.stalled(self.settings.cycle_lease)
            ):
                return {
                    "status": "failing",
                    "poller": "lease-stalled",
                    "lease_holder": holder.name,
                    "seconds_without_progress": round(holder.renewed_s, 1),
                }
        return {"status": "ok", "poller": "running"}

    def readiness(self) -> dict[str, str]:
        """Check each dependency within READY_WAIT, whatever the databases do; return 'ok' or the problem for each."""
        return self.checks.run({QUEUE_DB: self._check_queue_db, PORTFOLIO_DB: self._check_portfolio_db}, READY_WAIT)

    def _check_queue_db(self) -> str:
        """Tell whether queue-db answers."""
        try:
            with self.queue_db.transaction() as cur:
                cur.execute(query("ping"))
        except DatabaseError as err:
            return f"unreachable: {err.detail}"
        return "ok"

    def _check_portfolio_db(self) -> str:
        """Tell whether user-portfolio-db answers with the state schema migrated."""
        try:
            with self.portfolio_db.transaction() as cur:
                version = migrations.schema_version(cur)
        except DatabaseError as err:
            return f"unreachable: {err.detail}"
        if version != migrations.LATEST_VERSION:
            return f"state schema at version {version}, needs {migrations.LATEST_VERSION}"
        return "ok"

    def status(self) -> dict[str, Any]:
        """Describe tier values, watermarks, mode, parked count and the last cycle, from the kept snapshot."""
        listener, last = self.poller.listener, self.poller.last_result
        return {
            **self.cache.get(),
            "polling_interval": self.settings.polling_interval,
            "this_process": {
                "poller_alive": self.poller.is_alive(),
                # None when LISTEN_NOTIFY is off.
                "listening": None if listener is None else listener.listening.is_set(),
                "last_attempt": None if last is None else last.to_json(),
            },
        }

    def trigger(self) -> CycleResult | None:
        """Run a cycle now and return its result, or None if it is still running after TRIGGER_WAIT."""
        return self.poller.trigger()

    def metrics(self) -> bytes:
        """Return the Prometheus metrics of every process of this service instance."""
        return metrics.exposition(self.settings.metrics_dir)

    def corrections(self, limit: int) -> dict[str, Any]:
        """List the applied entries the queue has changed since, newest first."""
        return self._listing("count_corrections", "list_corrections", limit)

    def reused(self, limit: int, before: int | None) -> dict[str, Any]:
        """List the queue rows found carrying another transaction than the one applied under their queue_id, newest
        first, with where each new entry stands."""
        with self.portfolio_db.transaction() as cur:
            cur.execute(query("count_reused_entries"))
            total = one_row(cur)[0]
            page = fetch_page(cur, "list_reused_entries", {"before": before}, limit)
        return {"count": total, **page}

    def parked(self, limit: int) -> dict[str, Any]:
        """List parked entries, oldest first."""
        return self._listing("count_parked", "list_parked", limit)

    def _listing(self, count: str, rows: str, limit: int) -> dict[str, Any]:
        """Run a listing's two named queries: how many rows it has, and the first `limit` as JSON objects."""
        with self.portfolio_db.transaction() as cur:
            cur.execute(query(count))
            total = one_row(cur)[0]
            cur.execute(query(rows), {"limit": limit})
            entries = json_rows(cur)
        return {"count": total, "entries": entries}

    def update_tiers(self, changes: dict[str, Decimal], actor: str, reason: str | None) -> dict[str, Any]:
        """Store new tier values, all or nothing, with the action in the audit trail; describe the result."""
        with self.portfolio_db.transaction() as cur:
            updated = tiers.update(cur, changes)
            shown = {key: tiers.plain_decimal(value) for key, value in changes.items()}
            audit.record(cur, actor, audit.UPDATE_TIER_VALUES, {"tiers": sorted(changes)}, reason, {"values": shown})
        self.cache.forget()  # the next status request reads the new values
        return tiers.tiers_json(updated)

    def close(self) -> None:
        """Stop the poller and the drift checks' thread, and close both pools."""
        self.drift.stop()  # within one chunk
        self.poller.stop()
        self.queue_db.close()
        self.portfolio_db.close()


def report(result: CycleResult, standing: Standing | None = None) -> None:
    """Write a cycle's summary line and count it in the metrics."""
    logs.log_cycle(result, standing)
    metrics.observe_cycle(result, standing)


def service_of(flask_app: Flask) -> Service:
    """Return the service behind a Flask app."""
    service: Service = flask_app.extensions[EXTENSION]
    return service


def build_service(settings: Settings) -> Service:
    """Wire the databases, the cycle runner, the state and the poller together, one way; nothing connects yet."""
    # queue-db keeps its own TimeZone: a queue column without a time zone is read as its writers wrote it.
    queue_db = Database(QUEUE_DB, settings.queue_db_uri, settings, metrics.pool_tracker(QUEUE_DB), utc=False)
    portfolio_db = Database(PORTFOLIO_DB, settings.portfolio_db_uri, settings, metrics.pool_tracker(PORTFOLIO_DB))
    adoption = Adoption(settings, queue_db, portfolio_db)
    runner = CycleRunner(settings, queue_db, portfolio_db, adoption.prepare)
    cache = StateCache(portfolio_db, runner.watch)
    wake = threading.Event()
    listener = Listener(queue_db, wake.set) if settings.listen_notify else None
    cycle = functools.partial(run_and_report, runner, cache)
    poller = Poller(cycle, settings.polling_interval, settings.trigger_wait, wake, listener)
    return Service(
        settings,
        queue_db,
        portfolio_db,
        runner,
        cache,
        poller,
        audit.AuditTrail(portfolio_db),
        Journal(queue_db, portfolio_db),
        Actions(portfolio_db, poller.trigger, poller.wake, cache.forget),
        DriftChecks(settings, queue_db, portfolio_db),
        adoption,
    )
