"""The running service: settings, both databases, the cycle runner, the stored state and the poller, and what
they report."""

from __future__ import annotations

import functools
import logging
import math
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
from activity import Activity, read_activity
from adoption import Adoption, baseline_row
from config import Settings
from cycle import CycleRunner
from db import Database, DatabaseError, fetch_page, json_rows, one_row
from domain import (
    PORTFOLIO_DB,
    QUEUE_DB,
    QUEUES,
    Applying,
    Attempt,
    Backlog,
    CycleResult,
    Pause,
    Position,
    QueueBacklog,
    Standing,
)
from drift import DriftChecks
from horizon import HorizonWatch
from journal import Journal
from listener import Listener
from parked import ParkedFilter, ParkedPosition, read_parked
from poller import Poller, Progress
from portfolios import explain_portfolio
from queries import query, table_query
from sessions import ConsoleSessions

log = logging.getLogger(__name__)

EXTENSION = "consistency"  # the key of the service in app.extensions
# How old the state served by the status endpoint may be; every cycle this process runs refreshes it.
STATE_MAX_AGE = 1.0
# How many entries past a queue's read point the backlog probe looks at, at most, for the oldest settled one.
BACKLOG_SCAN = 1000
# What a caller is told of an unexpected error; the traceback goes to the log.
INTERNAL_ERROR = "internal error; see the service log"
# How long /ready waits for the databases' answers: well within the readiness probe's timeout (k8s/base: 5 s).
READY_WAIT = 1.5


class StateCache:
    """The deployment's state served by the status endpoint, read again when older than STATE_MAX_AGE.

    The stored state and the lease row come from user-portfolio-db in one transaction; what waits in the queues from
    queue-db right after, or, when a cycle of this process has just read the stored state, for the next request.
    """

    def __init__(self, portfolio_db: Database, queue_db: Database, watch: HorizonWatch) -> None:
        self._portfolio_db = portfolio_db
        self._queue_db = queue_db
        self._watch = watch  # this process's mode, which it may know before any cycle is stored
        self._kept: _Kept | None = None
        self._waiting = (Backlog({}, "not read yet"), -math.inf)  # and when it was read, by time.monotonic()
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any]:
        """Return the deployment's state as of at most STATE_MAX_AGE seconds ago, reading it again only when older.

        One request at a time reads it; meanwhile the others get the kept state, if there is one, rather
        than queue behind a read that may wait for a connect timeout.
        """
        kept = self._kept
        if kept is not None:
            if self._fresh(kept) or not self._lock.acquire(blocking=False):
                return self._shown(kept)
        else:
            self._lock.acquire()
        try:
            kept = self._kept  # or as read by the request this one waited for
            if kept is None or not _young(kept.read_at):
                return self.refresh()
            if not self._fresh(kept):  # a cycle moved the read points since the backlog was read
                self._read_backlog(kept.read_to)
            return self._shown(kept)
        finally:
            self._lock.release()

    def after_cycle(self) -> Standing:
        """Read the state a cycle left, for every request after it, and return its standing.

        Not what waits in queue-db: that is read for the first request that asks, so that a cycle costs no more.
        """
        with self._lock:
            state = self._read_state().state
        return Standing(state["watermarks"], state["parked_entries"], state["corrections"], state["reused_entries"])

    def forget(self) -> None:
        """Have the next status request read the state again."""
        with self._lock:
            self._kept = None

    def refresh(self) -> dict[str, Any]:
        """Read the stored state in one transaction, then what waits in queue-db; keep both and show them."""
        kept = self._read_state()
        self._read_backlog(kept.read_to)
        return self._shown(kept)

    def _fresh(self, kept: _Kept) -> bool:
        """Tell whether the kept state is young enough to serve, with the backlog read since."""
        return _young(kept.read_at) and self._waiting[1] >= kept.read_at

    def _shown(self, kept: _Kept) -> dict[str, Any]:
        """Show the kept state, its lease and backlog aged by the time since each was read."""
        (backlog, backlog_at), now = self._waiting, time.monotonic()
        lease_row = kept.lease.to_json(now - kept.read_at)
        return {**kept.state, "lease": lease_row, "backlog": backlog.to_json(now - backlog_at)}

    def _read_state(self) -> _Kept:
        """Read the stored state, the lease row with it, in one transaction on user-portfolio-db, and keep it."""
        with self._portfolio_db.transaction() as cur:
            current = tiers.load(cur)
            cur.execute(query("select_watermarks_reads_and_baselines"))
            rows = cur.fetchall()
            cur.execute(query("select_counts_pause_and_lease"))
            parked, corrections, reused, *paused, holder, epoch, renewed_s, expires_in_s = one_row(cur)
            cur.execute(query("select_last_cycle"))
            row = cur.fetchone()
        pause = None if paused[0] is None else Pause(*paused)
        metrics.observe_pause(pause)
        applying: Applying = "running" if pause is None else "paused"
        last = row[0] if row else None
        state = {
            "tiers": tiers.tiers_json(current),
            **_watermarks_and_baselines(rows),
            # The last stored cycle's, the same for every process; this process's own before any is stored.
            "mode": (last or {}).get("mode") or self._watch.mode,
            "parked_entries": parked,
            "corrections": corrections,
            "reused_entries": reused,
            "applying": applying,
            "pause": None if pause is None else pause.to_json(),
            "last_cycle": last,
        }
        stored = lease.Stored(holder, epoch, renewed_s or 0.0, expires_in_s or 0.0)
        self._kept = _Kept(state, stored, _read_points(rows, last), time.monotonic())
        return self._kept

    def _read_backlog(self, read_to: dict[str, Position]) -> None:
        """Read what waits in queue-db past each queue's read point, and keep it."""
        self._waiting = (read_backlog(self._queue_db, read_to), time.monotonic())


@dataclass(frozen=True)
class _Kept:
    """The stored state as read at one time: shown as it is, but for the lease; and each queue's read point."""

    state: dict[str, Any]
    lease: lease.Stored
    read_to: dict[str, Position]
    read_at: float  # by time.monotonic()


def _young(read_at: float) -> bool:
    """Tell whether something read at `read_at` (time.monotonic()) is at most STATE_MAX_AGE seconds old."""
    return time.monotonic() - read_at <= STATE_MAX_AGE


def _watermarks_and_baselines(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Show select_watermarks_reads_and_baselines rows: each queue's watermark, and its baseline if it has one."""
    watermarks = {
        queue: {"updated_at": ts.isoformat(), "queue_id": queue_id, "moved_at": moved.isoformat()}
        for queue, ts, queue_id, moved, *_ in rows
    }
    baselines = {row[0]: baseline_row(row[0], row[6:]).to_json() for row in rows if row[6] is not None}
    return {"watermarks": watermarks, "baseline": baselines}


def _read_points(rows: list[tuple[Any, ...]], last: dict[str, Any] | None) -> dict[str, Position]:
    """Return how far each queue is known to have been read.

    That is the furthest of its watermark, its read position (look-back mode) and the start of the last cycle, if that
    cycle drained every queue.
    """
    points = {}
    for queue, ts, queue_id, _, read_ts, read_id, *_ in rows:
        known = [(ts, queue_id), *([] if read_ts is None else [(read_ts, read_id)]), *_drained_before(last)]
        points[queue] = max(known)
    return points


def _drained_before(last: dict[str, Any] | None) -> list[Position]:
    """Return the start of the last cycle as a position if it was ok and read every queue to the end; else nothing.

    What settled before such a cycle, it applied or parked, as the lag metric has it; the stored watermark may trail
    (exact mode's margin, an open queue-db transaction), and what is between is not waiting.
    """
    if last is None or last.get("result") != "ok" or last.get("stopped_early") is not False:
        return []
    return [(datetime.fromisoformat(last["started_at"]), 0)]


def read_backlog(queue_db: Database, read_to: dict[str, Position]) -> Backlog:
    """Find the oldest settled entry past each queue's read point in queue-db, or why queue-db could not tell.

    One index probe per queue, over BACKLOG_SCAN entries at most, whatever the size of the history behind it.
    """
    queues = {}
    try:
        with queue_db.connection(autocommit=True) as conn, conn.cursor() as cur:
            for queue in QUEUES:
                after = read_to.get(queue.name)
                if after is None:
                    continue
                params = {"after_ts": after[0], "after_id": after[1], "scan": BACKLOG_SCAN}
                cur.execute(table_query("queue_backlog", queue.table), params)
                row = cur.fetchone()
                queues[queue.name] = QueueBacklog(after, (row[0], row[1]), row[2]) if row else QueueBacklog(after)
    except DatabaseError as err:
        return Backlog({}, str(err))
    return Backlog(queues)


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


class LastAttempt:
    """This process's last attempt at a cycle, as run_and_report noted it: what /status shows of this process."""

    def __init__(self) -> None:
        self.attempt: Attempt | None = None

    def note(self, result: CycleResult, holder: lease.Holder | None) -> None:
        """Keep a cycle's result, with the lease holder it found if that made it skip."""
        self.attempt = Attempt(result, holder.name if result.outcome == "skipped" and holder is not None else None)


def run_and_report(
    runner: CycleRunner,
    cache: StateCache,
    attempts: LastAttempt,
    lock_wait: float,
    progress: Progress,
    fresh_for: float,
) -> CycleResult:
    """Run one cycle and report it, whatever happens.

    It notes the cycle as this process's last attempt, reads the state it left, and writes its summary line and
    metrics. The one place that owns unexpected errors of a cycle: they are logged with their traceback and
    reported as a failed cycle, and the poller goes on.
    """
    started, clock = datetime.now(UTC), time.monotonic()
    try:
        result = runner.run(lock_wait, progress, fresh_for)
    except Exception:
        log.exception("unexpected error in the consistency cycle")
        result = CycleResult.finish(started, clock, "error", error=INTERNAL_ERROR)
        attempts.note(result, None)
        report(result)
        return result
    attempts.note(result, runner.holder)
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
    sessions: ConsoleSessions
    checks: BoundedChecks = field(default_factory=BoundedChecks)  # what /ready runs, each within READY_WAIT
    attempts: LastAttempt = field(default_factory=LastAttempt)  # noted by the poller's cycle (run_and_report)

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
        """Describe the deployment from the kept snapshot of its stored state, and apart, the process that answers."""
        listener, last = self.poller.listener, self.attempts.attempt
        return {
            **self.cache.get(),
            "polling_interval": self.settings.polling_interval,
            "this_process": {
                "name": lease.this_process(),
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

    def activity(self) -> Activity:
        """Tell what the deployment applied minute by minute over the last hour, and its last cycles."""
        return read_activity(self.portfolio_db)

    def reused(self, limit: int, before: int | None) -> dict[str, Any]:
        """List the queue rows found carrying another transaction than the one applied under their queue_id, newest
        first, with where each new entry stands."""
        with self.portfolio_db.transaction() as cur:
            cur.execute(query("count_reused_entries"))
            total = one_row(cur)[0]
            page = fetch_page(cur, "list_reused_entries", {"before": before}, limit)
        return {"count": total, **page}

    def parked_page(self, where: ParkedFilter, limit: int, after: ParkedPosition | None = None) -> dict[str, Any]:
        """List the parked entries a filter matches, oldest first, a bounded page after a position (see read_parked)."""
        return read_parked(self.portfolio_db, where, limit, after)

    def portfolio(self, account: str, limit: int, before: int | None = None) -> dict[str, Any] | None:
        """Tell why an account's portfolio shows what it does (see explain_portfolio); None for an unknown account."""
        return explain_portfolio(self.portfolio_db, account, limit, before)

    def _listing(self, count: str, rows: str, limit: int) -> dict[str, Any]:
        """Run a listing's two named queries: how many rows it has, and the first `limit` as JSON objects."""
        with self.portfolio_db.transaction() as cur:
            cur.execute(query(count))
            total = one_row(cur)[0]
            cur.execute(query(rows), {"limit": limit})
            entries = json_rows(cur)
        return {"count": total, "entries": entries}

    def tier_history(self, limit: int, before: int | None) -> dict[str, Any]:
        """List the changes of the tier values, newest first, a page at a time (tiers.history)."""
        return tiers.history(self.portfolio_db, limit, before)

    def update_tiers(
        self, changes: dict[str, Decimal], actor: str, reason: str | None, expected_version: int | None = None
    ) -> dict[str, Any]:
        """Store new tier values, all or nothing, with the action in the audit trail; describe the result. With
        `expected_version`, raise tiers.TiersChanged instead when the values in force are no longer that version."""
        with self.portfolio_db.transaction() as cur:
            updated = tiers.update(cur, changes, expected_version)
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
    cache = StateCache(portfolio_db, queue_db, runner.watch)
    attempts = LastAttempt()
    wake = threading.Event()
    listener = Listener(queue_db, wake.set) if settings.listen_notify else None
    cycle = functools.partial(run_and_report, runner, cache, attempts)
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
        ConsoleSessions(portfolio_db, settings.console_idle_timeout),
        attempts=attempts,
    )
