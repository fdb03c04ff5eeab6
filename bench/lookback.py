"""Look-back mode at size: idle cycles and sweeps after a burst, behind a long history, against exact mode."""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import psycopg2

import config
import service
from bench.data import TIERS, build_templates, fresh_copy, run
from devkit import postgres, roles

TABLES = {"investment": "investment_queue", "withdrawal": "withdrawal_queue"}


@dataclass(frozen=True)
class Figures:
    """What one mode's run showed: idle cycle times, and the rows its sweeps read after the burst."""

    idle_median_ms: float
    idle_max_ms: float
    burst_swept: int  # rows the sweep read in the cycle that drained the burst
    swept: int  # rows the sweeps read in the sweep_seconds after it
    sweep_seconds: float
    burst: BurstTimes | None = None  # look-back mode: how the burst's cycle spent its time


@dataclass(frozen=True)
class BurstTimes:
    """The cycle that drained the burst and swept it, timed from outside, with an entry queued during its sweep."""

    drain_s: float  # from the cycle's start until its drain had read the burst's last entry
    sweep_s: float  # from then to the cycle's end: the first sweep, in slices between drains
    new_entry_s: float | None  # from the commit of an entry queued once the drain was done to its record; None if
    # the sweep ended first


def queue_ends(queue_uri: str) -> dict[str, tuple[Any, int]]:
    """Return the position of each queue's last entry."""
    conn = psycopg2.connect(queue_uri)
    with conn.cursor() as cur:
        ends = {}
        for queue, table in TABLES.items():
            cur.execute(f"SELECT updated_at, queue_id FROM {table} ORDER BY updated_at DESC, queue_id DESC LIMIT 1")  # noqa: S608
            ends[queue] = cur.fetchone()
    conn.close()
    return ends


def poll(
    conn: Any, statement: str, params: dict[str, Any], done: Callable[[list[tuple]], bool], stop: threading.Event
) -> bool:
    """Run a statement every 20 ms until its rows satisfy `done`; False if `stop` came first."""
    while not stop.is_set():
        with conn.cursor() as cur:
            cur.execute(statement, params)
            if done(cur.fetchall()):
                return True
        stop.wait(0.02)
    return False


def watch_burst(queue_uri: str, portfolio_uri: str, ends: dict[str, tuple[Any, int]], stop: threading.Event,
                marks: dict[str, float]) -> None:  # fmt: skip
    """Mark when the drain has read every queue to its end, queue an entry then, and mark when it is recorded."""
    conn = psycopg2.connect(portfolio_uri)
    conn.autocommit = True
    try:
        read = "SELECT queue, read_updated_at, read_queue_id FROM consistency.watermarks"
        if not poll(conn, read, {}, lambda rows: all(r[1] is not None and (r[1], r[2]) >= ends[r[0]] for r in rows),
                    stop):  # fmt: skip
            return
        marks["drained"] = time.monotonic()
        qconn = psycopg2.connect(queue_uri)
        with qconn, qconn.cursor() as cur:
            cur.execute("INSERT INTO investment_queue (account_number, uuid, status) VALUES"
                        " ('3999999999', gen_random_uuid()::text, 'COMPLETED') RETURNING queue_id")  # fmt: skip
            (queue_id,) = cur.fetchone()
        qconn.close()
        marks["queued"] = time.monotonic()
        recorded = (
            "SELECT 1 FROM consistency.applied_entries WHERE queue = 'investment' AND queue_id = %(id)s UNION ALL"
            " SELECT 1 FROM consistency.parked_entries WHERE queue = 'investment' AND queue_id = %(id)s"
        )
        if poll(conn, recorded, {"id": queue_id}, bool, stop):
            marks["recorded"] = time.monotonic()
    finally:
        conn.close()


def timed_burst(svc: service.Service, admin: tuple[str, str]) -> tuple[dict[str, Any], BurstTimes]:
    """Run the cycle that drains the burst and sweeps it, timed from outside by watch_burst."""
    marks: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_burst, args=(*admin, queue_ends(admin[0]), stop, marks))
    started = time.monotonic()
    watcher.start()
    try:
        drained = svc.poller.run_once().to_json()
    finally:
        ended = time.monotonic()
        stop.set()
        watcher.join()
    drained_at = marks.get("drained", ended)
    late = marks["recorded"] - marks["queued"] if "recorded" in marks else None
    return drained, BurstTimes(drained_at - started, ended - drained_at, late)


def add_history(queue_uri: str, rows: int) -> None:
    """Add `rows` settled entries per queue, a day older than the burst: history behind the watermarks."""
    for table in TABLES.values():
        run(queue_uri, f"INSERT INTO {table} (account_number, uuid, status, updated_at)"  # noqa: S608
                       " SELECT (3000000000 + n / 10)::text, md5('h' || n)::uuid::text, 'COMPLETED',"
                       " now() - interval '1 day' + n * interval '1 millisecond' FROM generate_series(1, %s) AS n",
            (rows,))  # fmt: skip
    run(queue_uri, "ANALYZE")


def place_watermarks(queue_uri: str, portfolio_uri: str) -> None:
    """Put each queue's watermark at the end of its history, just before the burst."""
    conn = psycopg2.connect(queue_uri)
    with conn.cursor() as cur:
        ends = {}
        for queue, table in TABLES.items():
            cur.execute(f"SELECT max(updated_at) FROM {table} WHERE account_number >= '3'")  # noqa: S608
            ends[queue] = cur.fetchone()[0]
    conn.close()
    for queue, end in ends.items():
        run(portfolio_uri, "UPDATE consistency.watermarks SET updated_at = %s, queue_id = 2147483647 WHERE queue = %s",
            (end, queue))  # fmt: skip


def one_mode(settings: config.Settings, admin: tuple[str, str], sweep_seconds: float, cycles: int) -> Figures:
    """Drain the burst, time idle cycles, then cycle for sweep_seconds with a sweep every second and count its rows."""
    svc = service.build_service(replace(settings, reconcile_interval=3600.0))
    burst = None
    try:
        svc.runner.prepare()
        place_watermarks(settings.queue_db_uri, settings.portfolio_db_uri)
        if sweep_seconds:  # look-back mode: the burst, and the first sweep in the same cycle
            drained, burst = timed_burst(svc, admin)
        else:
            drained = svc.poller.run_once().to_json()
        if drained["result"] != "ok":
            raise RuntimeError(f"the burst did not drain: {drained}")
        burst_swept = sum(c["swept"] for c in drained["counts"].values())
        times = []
        for _ in range(cycles):
            started = time.perf_counter()
            summary = svc.poller.run_once().to_json()
            times.append((time.perf_counter() - started) * 1000)
            if summary["result"] != "ok" or summary["reconciled"]:
                raise RuntimeError(f"an idle cycle swept or failed: {summary}")
    finally:
        svc.close()
    sweeping = service.build_service(replace(settings, reconcile_interval=1.0))
    swept, deadline = 0, time.monotonic() + sweep_seconds
    try:
        while time.monotonic() < deadline:
            counts = sweeping.poller.run_once().to_json().get("counts") or {}
            swept += sum(c["swept"] for c in counts.values())
            time.sleep(0.1)
    finally:
        sweeping.close()
    return Figures(statistics.median(times), max(times), burst_swept, swept, sweep_seconds, burst)


def lookback_at_size(server: str, history: int, burst: int, sweep_seconds: float, cycles: int = 20) -> dict[str, Any]:
    """Run exact and look-back mode on copies of one history and burst; return each mode's figures."""
    templates = build_templates(server, burst)
    add_history(postgres.with_database(server, templates[0]), history // 2)
    results: dict[str, Any] = {"history": history, "burst": burst}
    try:
        with roles.login_role(server, "bench_lookback") as role:
            for mode in ("exact", "lookback"):
                *uris, names = fresh_copy(server, templates)
                admin = (uris[0], uris[1])
                if mode == "lookback":
                    roles.apply_grants(server, role, *names)
                    uris = [roles.with_user(uri, role) for uri in uris]
                environ = {**TIERS, "QUEUE_DB_URI": uris[0], "USER_PORTFOLIO_DB_URI": uris[1]}
                settings = config.load_settings({**environ, "LOOKBACK_WINDOW": "2", "BATCH_SIZE": "5000"})
                try:
                    results[mode] = one_mode(settings, admin, sweep_seconds if mode == "lookback" else 0.0, cycles)
                finally:
                    for name in names:
                        postgres.drop(server, name)
    finally:
        for template in templates:
            postgres.drop(server, template)
    return results


def lookback_rows(figures: dict[str, Any]) -> list[tuple[str, str]]:
    """Describe look-back mode against exact mode: the idle cycle, and what the sweeps read."""
    exact, lookback = figures["exact"], figures["lookback"]
    per_minute = lookback.swept / lookback.sweep_seconds * 60
    return [
        (
            "idle cycle, look-back",
            f"median {lookback.idle_median_ms:.1f} ms, max {lookback.idle_max_ms:.1f} ms = "
            f"{lookback.idle_median_ms / exact.idle_median_ms:.2f}x exact mode's median {exact.idle_median_ms:.1f} ms "
            f"(target <= 2x); {figures['history']:,} entries of history, after a burst of {figures['burst']:,}",
        ),
        (
            "sweep rows read, look-back",
            f"{lookback.burst_swept:,} in the cycle that drained the burst of {figures['burst']:,}, then "
            f"{lookback.swept:,} in {lookback.sweep_seconds:g} s of cycles with a sweep every second "
            f"({per_minute:,.0f} a minute), with nothing changed; {figures['history']:,} entries of history "
            "behind the watermarks, never read; the sweeps find only the entry queued during the first sweep",
        ),
        burst_row(lookback.burst, figures["burst"]),
    ]


def burst_row(burst: BurstTimes, entries: int) -> tuple[str, str]:
    """Describe the cycle that drained the burst: its drain, its first sweep, and an entry queued during the sweep."""
    late = (
        "the sweep ended first" if burst.new_entry_s is None else f"recorded {burst.new_entry_s:.2f} s after its commit"
    )
    return (
        "first sweep after a drain, look-back",
        f"drain of {entries:,} {burst.drain_s:.1f} s, then the sweep {burst.sweep_s:.1f} s = "
        f"{burst.sweep_s / burst.drain_s:.2f}x the drain (target <= 1x); an entry queued as the sweep began: {late} "
        "(target <= POLLING_INTERVAL + 1 s)",
    )


def main() -> None:
    """Run the look-back rows alone and print them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--history", type=int, default=1_000_000, help="entries of history (default 1000000)")
    parser.add_argument("--burst", type=int, default=50_000, help="entries in the burst (default 50000)")
    parser.add_argument("--sweep-seconds", type=float, default=10.0, help="seconds of sweeping cycles (default 10)")
    args = parser.parse_args()
    server, keep_alive = postgres.server_uri()
    for name, value in lookback_rows(lookback_at_size(server, args.history, args.burst, args.sweep_seconds)):
        print(f"| {name} | {value} |")
    del keep_alive


if __name__ == "__main__":
    main()
