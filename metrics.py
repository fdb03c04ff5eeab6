"""Prometheus metrics: their definitions, what updates them, and the text served at /metrics.

Under gunicorn every worker is a process of its own. prometheus_client's multiprocess mode (switched on by
PROMETHEUS_MULTIPROC_DIR, which gunicorn.conf.py sets before any worker imports this module) keeps each
process's values in files in that directory, and a scrape of any worker adds them up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import get_args

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector

from domain import DATABASES, DRIFT_KINDS, OUTCOMES, QUEUES, CycleResult, Outcome, Pause, Standing

RESULTS = get_args(Outcome)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

CYCLES = Counter(
    "consistency_cycles",
    "Cycles by result: ok, error, skipped (another process had the turn or had just run one) or paused.",
    ["result"],
)
ENTRIES = Counter(
    "consistency_entries",
    "Queue entries applied, by queue and outcome; parked counts every parking, a retry's included.",
    ["queue", "outcome"],
)
REUSED = Counter(
    "consistency_reused_entries",
    "Queue rows found carrying another transaction than the one applied under their queue and queue_id, by queue:"
    " new entries, as after queue-db was restored from a backup.",
    ["queue"],
)
BATCHES = Counter(
    "consistency_batches",
    "Batches applied, by way: clean (every entry could apply) or careful (the steps that give the rest their reasons).",
    ["way"],
)
WAYS = ("clean", "careful")
DURATION = Histogram(
    "consistency_cycle_duration_seconds",
    "Duration of the cycles this service ran (ok, error, or paused mid-way; skipped turns and paused ones are not).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
LAG = Gauge(
    "consistency_lag_seconds",
    "Upper bound on the age of the oldest settled entry not yet applied; 0 after a cycle that drained both queues.",
    multiprocess_mode="mostrecent",
)
PARKED = Gauge(
    "consistency_parked_entries", "Entries parked at the end of the last cycle run.", multiprocess_mode="mostrecent"
)
CORRECTIONS = Gauge(
    "consistency_corrections",
    "Applied entries whose queue status changed afterwards, at the end of the last cycle run; the first outcome stays.",
    multiprocess_mode="mostrecent",
)
OLDEST_TRANSACTION = Gauge(
    "consistency_oldest_queue_transaction_seconds",
    "Age of the oldest open queue-db transaction at the last ok cycle; the watermarks wait behind it (exact mode).",
    multiprocess_mode="mostrecent",
)
LAST_SUCCESS = Gauge(
    "consistency_last_success_timestamp_seconds", "Unix time the last ok cycle ended.", multiprocess_mode="max"
)
PAUSED = Gauge(
    "consistency_paused",
    "1 while an operator has paused applying (every process then applies nothing), else 0; as last read.",
    multiprocess_mode="mostrecent",
)
PAUSE_STARTED = Gauge(
    "consistency_pause_started_timestamp_seconds",
    "Unix time the pause in force began; 0 while applying goes on.",
    multiprocess_mode="mostrecent",
)
DRIFT_FINDINGS = Gauge(
    "consistency_drift_findings",
    "Findings of the last finished drift check, by kind; every process reads them from the stored checks.",
    ["kind"],
    multiprocess_mode="mostrecent",
)
DRIFT_LAST_CHECK = Gauge(
    "consistency_drift_last_check_timestamp_seconds",
    "Unix time the last finished drift check ended; 0 before the first.",
    multiprocess_mode="max",
)
DB_ERRORS = Counter(
    "consistency_db_errors",
    "Driver errors that ended a block holding a pooled connection, by database: a connection that could not be"
    " opened or broke, or a statement that failed and was not handled.",
    ["database"],
)
LEASE_TAKEN = Counter(
    "consistency_lease_taken",
    "Cycle leases this process took: each starts a new epoch, so the processes that take them show who ran cycles.",
)
POOL_IN_USE = Gauge(
    "consistency_db_pool_connections_in_use",
    "Pooled connections lent out, per database, summed over live processes.",
    ["database"],
    multiprocess_mode="livesum",
)

# Every series exists from the start, so a rate over a fresh process reads 0 rather than nothing.
for _result in RESULTS:
    CYCLES.labels(result=_result)
for _queue in QUEUES:
    for _outcome in OUTCOMES:
        ENTRIES.labels(queue=_queue.name, outcome=_outcome)
    REUSED.labels(queue=_queue.name)
for _database in DATABASES:
    POOL_IN_USE.labels(database=_database)
    DB_ERRORS.labels(database=_database)
for _way in WAYS:
    BATCHES.labels(way=_way)
for _kind in DRIFT_KINDS:
    DRIFT_FINDINGS.labels(kind=_kind)


def observe_cycle(result: CycleResult, standing: Standing | None = None) -> None:
    """Count a finished cycle; `standing` is the state read after it, if known."""
    CYCLES.labels(result=result.outcome).inc()
    if result.outcome != "skipped" and (result.outcome != "paused" or result.work is not None):
        DURATION.observe(result.duration_ms / 1000)
    work = result.work
    for queue, counts in (work.counts if work else {}).items():
        for outcome in OUTCOMES:
            if counts.get(outcome):
                ENTRIES.labels(queue=queue, outcome=outcome).inc(counts[outcome])
        if counts.get("reused"):
            REUSED.labels(queue=queue).inc(counts["reused"])
    if result.outcome == "ok" and work is not None:
        LAST_SUCCESS.set(time.time())
        OLDEST_TRANSACTION.set(work.oldest_transaction_s or 0)
        if not work.stopped_early:
            LAG.set(0)
    if standing is not None:
        PARKED.set(standing.parked)
        CORRECTIONS.set(standing.corrections)


def observe_pause(pause: Pause | None) -> None:
    """Show the pause just read from the stored state: whether applying is paused, and since when."""
    PAUSED.set(0 if pause is None else 1)
    PAUSE_STARTED.set(0 if pause is None else pause.paused_at.timestamp())


def observe_way(clean: bool) -> None:
    """Count a batch applied, the clean way or the careful way (sql/migrations/0012_clean_batches.sql)."""
    BATCHES.labels(way="clean" if clean else "careful").inc()


def observe_batch(last_read: datetime, applied: int) -> None:
    """After a batch of a drain applied or parked entries, set the lag to the age of the last entry it read.

    Entries come in updated_at order, so every entry not read yet is younger than that one. A batch that
    applied nothing only re-read entries already applied (the watermark trails what was read) and tells nothing.
    """
    if applied:
        LAG.set(max(0.0, time.time() - last_read.timestamp()))


def observe_drift(counts: dict[str, int], finished_at: datetime) -> None:
    """Show the findings by kind of the last finished drift check, and when it finished."""
    for kind in DRIFT_KINDS:
        DRIFT_FINDINGS.labels(kind=kind).set(counts.get(kind, 0))
    DRIFT_LAST_CHECK.set(finished_at.timestamp())


def observe_db_error(database: str) -> None:
    """Count a driver error that ended a block holding one of the database's pooled connections."""
    DB_ERRORS.labels(database=database).inc()


def observe_lease_taken() -> None:
    """Count a cycle lease this process took."""
    LEASE_TAKEN.inc()


def pool_tracker(database: str) -> Callable[[int], None]:
    """Return what a database's pool calls with +1 when it lends a connection and -1 when it gets it back."""
    gauge = POOL_IN_USE.labels(database=database)
    return gauge.inc


def exposition(metrics_dir: str | None) -> bytes:
    """Return every metric in Prometheus text format: of all processes when they share a directory."""
    if metrics_dir is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]  # unannotated upstream
    return generate_latest(registry)
