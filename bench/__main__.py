"""python -m bench: drain one backlog several ways, and each traffic shape by the service and the lean bound on an
empty ledger and behind history; check they agree, and print one table of rates, ratios, memory, idle-cycle time,
HTTP latency under load and the other parts' rows."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2

from bench import http
from bench.approaches import BOUND_BATCH, lean, per_entry, set_based
from bench.console import console_pages, console_rows
from bench.data import TIERS, build_templates, fresh_copy, snapshot
from bench.drift import drift_check, drift_row
from bench.idle import idle_cycle_ms
from bench.latency import measure_latency
from bench.lookback import lookback_at_size, lookback_rows
from bench.serve import service_env, status, stored_cycle, worker_peak_rss_mb
from bench.shapes import TARGET, description, differing, low_ratios, measure_shapes, shape_rows
from devkit import gunicorn, postgres
from devkit.net import free_port, wait_until

SERVICE_PATHS = ("/health", "/api/v1/consistency/status")
BIG_BATCH = "service at the bound's batch"


def run_service(
    queue_uri: str, portfolio_uri: str, batch_size: int, entries: int, during: Callable[[int], None] | None = None
) -> tuple[float, float, bool]:
    """Start the service under gunicorn; its start-up cycle drains the backlog while `during(port)` runs.

    Return the drain's seconds, the workers' peak RSS, and whether the drain outlasted `during`.
    """
    port = free_port()
    # No cycle but the start-up one, so that the last cycle is the drain; no drift check, which would walk the
    # ledger beside it (the drift row measures that on its own).
    env = service_env(
        queue_uri,
        portfolio_uri,
        port,
        POLLING_INTERVAL="3600",
        BATCH_SIZE=str(batch_size),
        LISTEN_NOTIFY="false",
        DRIFT_CHECK_INTERVAL="0",
    )
    with gunicorn.running(gunicorn.command(), env, subprocess.DEVNULL) as service:
        wait_until(lambda: status(port), 60, "the service to answer")
        if during is not None:
            during(port)
        loaded_until = datetime.now(UTC)
        last = stored_cycle(port, 3600, "the drain to finish")
        read = sum(counts["read"] for counts in last["counts"].values()) if last["result"] == "ok" else 0
        if read != entries:
            raise SystemExit(f"the service's last cycle is not the drain of {entries} entries: {last}")
        seconds = last["duration_ms"] / 1000
        drained_at = datetime.fromisoformat(last["started_at"]) + timedelta(seconds=seconds)
        return seconds, worker_peak_rss_mb(service.pid), drained_at > loaded_until


def run_floor(queue_uri: str, portfolio_uri: str, during: Callable[[int], None]) -> bool:
    """Serve the do-nothing floor app while the set-based bound drains; tell whether the drain outlasted `during`."""
    port = free_port()
    env = service_env(queue_uri, portfolio_uri, port)  # what the shipped gunicorn.conf.py reads
    floor = gunicorn.command("-c", "python:bench.floor", app="bench.floor:app")
    with gunicorn.running(floor, env, subprocess.DEVNULL):
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1), 30, "the floor")
        with ThreadPoolExecutor(max_workers=1) as pool:
            drain = pool.submit(set_based, queue_uri, portfolio_uri, TIERS)
            during(port)
            outlasted = not drain.done()
            drain.result()  # the drain's own error, if it failed
        return outlasted


def http_loads(seconds: int, paths: tuple[str, ...]) -> tuple[dict[str, http.Load], Callable[[int], None]]:
    """Return where wrk's figures go and a `during` that fills them: each path, paced and saturated."""
    loads: dict[str, http.Load] = {}

    def during(port: int) -> None:
        """Run each wrk load in turn against the port."""
        for path in paths:
            for paced in (True, False):
                loads[f"{path} {'paced' if paced else 'saturated'}"] = http.wrk(
                    f"http://127.0.0.1:{port}{path}", seconds, paced
                )

    return loads, during


def measure(
    server: str, entries: int, batch_size: int, with_per_entry: bool, http_seconds: int, rounds: int = 1
) -> dict[str, Any]:
    """Drain a backlog of `entries` with each approach on fresh copies; return rates and fingerprints.

    The service and the two bounds take turns for `rounds` rounds and keep their best rate, so that a moment
    of noise on a shared machine does not decide the ratio.
    """
    templates = build_templates(server, entries)
    results: dict[str, Any] = {"entries": entries, "snapshots": []}
    runs: list[tuple[str, Callable[..., float] | None]] = [
        ("service", None),
        ("set-based bound", set_based),
        ("lean bound", lean),
        (BIG_BATCH, None),
    ] * rounds
    if with_per_entry:
        runs.append(("per-entry loop", per_entry))
    if http_seconds and http.available():
        runs += [("service under HTTP load", None), ("floor under HTTP load", None)]
    try:
        for name, approach in runs:
            queue_uri, portfolio_uri, names = fresh_copy(server, templates)
            try:
                if approach is not None:
                    seconds = approach(queue_uri, portfolio_uri, TIERS)
                else:
                    seconds = drain_by_service(
                        name, queue_uri, portfolio_uri, batch_size, entries, http_seconds, results
                    )
                if seconds:
                    results[name] = max(entries / seconds, results.get(name, 0))
                results["snapshots"].append(snapshot(portfolio_uri))
            finally:
                for dbname in names:
                    postgres.drop(server, dbname)
    finally:
        for template in templates:
            postgres.drop(server, template)
    return results


def drain_by_service(
    name: str,
    queue_uri: str,
    portfolio_uri: str,
    batch_size: int,
    entries: int,
    http_seconds: int,
    results: dict[str, Any],
) -> float:
    """Drain one copy with the service, or serve the floor app while the bound drains, as `name` says.

    Return the drain's seconds (0 for the floor), and keep what else it measured in `results`.
    """
    if name == "service":
        seconds, rss, _ = run_service(queue_uri, portfolio_uri, batch_size, entries)
        results["service peak RSS MB"] = max(rss, results.get("service peak RSS MB", 0))
        results["sizes"] = state_sizes(portfolio_uri)
    elif name == BIG_BATCH:
        seconds, _, _ = run_service(queue_uri, portfolio_uri, BOUND_BATCH, entries)
    elif name == "service under HTTP load":
        results["http"], during = http_loads(http_seconds, SERVICE_PATHS)
        seconds, _, results["load while draining"] = run_service(queue_uri, portfolio_uri, batch_size, entries, during)
    else:
        results["floor"], during = http_loads(http_seconds, ("/health",))
        results["floor while draining"] = run_floor(queue_uri, portfolio_uri, during)
        seconds = 0.0
    return seconds


def state_sizes(portfolio_uri: str) -> dict[str, int]:
    """Return the bytes the ledger and the journal take on disk, indexes included, after a drain."""
    with psycopg2.connect(portfolio_uri) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pg_total_relation_size('consistency.applied_entries'),"
            " pg_total_relation_size('consistency.journal')"
        )
        ledger, journal = cur.fetchone()
    conn.close()
    return {"ledger": ledger, "journal": journal}


def size_rows(sizes: dict[str, int], entries: int) -> list[tuple[str, str]]:
    """Describe how large the ledger and the journal grow per million entries applied, indexes included."""
    return [
        (f"{name} size", f"{sizes[name] / entries * 1_000_000 / 2**20:,.0f} MB per million entries, indexes included")
        for name in ("ledger", "journal")
    ]


def http_rows(big: dict[str, Any]) -> list[tuple[str, str]]:
    """Describe the HTTP loads on the service and on the do-nothing floor app, or why there are none."""
    if "http" not in big:
        return [("HTTP under load", "not measured: wrk is not installed (apt-get install wrk), or --http-seconds 0")]
    rows = []
    for label, loads, draining in (
        ("HTTP", big["http"], big["load while draining"]),
        ("HTTP floor (no-op app)", big["floor"], big["floor while draining"]),
    ):
        for name, load in loads.items():
            path, kind = name.split()
            floor = big["floor"][f"/health {kind}"]
            rows.append((f"{label} {path} {kind}", load_text(load, kind, draining, floor if label == "HTTP" else None)))
    return rows


def load_text(load: http.Load, kind: str, draining: bool, floor: http.Load | None) -> str:
    """Describe one wrk load: percentiles, rate, how it was made, and the p99 as a multiple of the floor's."""
    how = f"{http.CONNECTIONS} connections, " + (
        f"each pausing 0-{2 * http.PACE_MS} ms" if kind == "paced" else "no pause (closed loop)"
    )
    against = f" = {load.p99_ms / floor.p99_ms:.1f}x the floor's" if floor else ""
    during = "while draining" if draining else "NOT all while draining: the drain ended first"
    return (
        f"p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms{against} (target p99 < 10 ms) at "
        f"{load.rate:,.0f} requests/s; {how}; {load.errors} errors; {during}"
    )


def latency_rows(on: dict[str, Any], off: dict[str, Any]) -> list[tuple[str, str]]:
    """Describe the time from a COMPLETED commit to the portfolio update, with and without notifications."""
    bound = off["polling_interval_ms"] + off["cycle_ms"]
    return [
        (
            "latency, notifications",
            f"median {on['median_ms']:.0f} ms, p90 {on['p90_ms']:.0f} ms over {on['samples']} commits "
            "(target median < 250 ms)",
        ),
        (
            "latency, polling only",
            f"median {off['median_ms']:.0f} ms, p90 {off['p90_ms']:.0f} ms over {off['samples']} commits "
            f"(target median <= POLLING_INTERVAL {off['polling_interval_ms']:.0f} ms + one cycle "
            f"{off['cycle_ms']:.0f} ms = {bound:.0f} ms)",
        ),
    ]


def arguments() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=200_000, help="backlog size, and each shape's (default 200000)")
    parser.add_argument(
        "--per-entry-entries",
        type=int,
        default=20_000,
        help="backlog for the slow per-entry loop, run on its own smaller copy (default 20000)",
    )
    parser.add_argument("--batch-size", type=int, default=5000, help="the service's BATCH_SIZE (default 5000)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="turns the service and the bound take, best kept (default 2)"
    )
    parser.add_argument(
        "--http-seconds", type=int, default=2, help="length of each wrk load during a drain; 0 skips (default 2)"
    )
    parser.add_argument(
        "--idle-rows", type=int, default=1_000_000, help="rows per queue table for the idle cycle (default 1000000)"
    )
    parser.add_argument(
        "--latency-samples", type=int, default=20, help="commits timed with and without notifications (default 20)"
    )
    parser.add_argument(
        "--polling-interval", type=float, default=1.0, help="POLLING_INTERVAL for the latency runs (default 1.0)"
    )
    parser.add_argument(
        "--drift-entries", type=int, default=1_000_000, help="applied entries a drift check walks (default 1000000)"
    )
    parser.add_argument(
        "--lookback-history", type=int, default=1_000_000, help="entries behind the look-back rows (default 1000000)"
    )
    parser.add_argument(
        "--lookback-burst", type=int, default=50_000, help="the burst the look-back rows drain (default 50000)"
    )
    parser.add_argument(
        "--lookback-sweep-seconds", type=float, default=10.0, help="cycles timed with a sweep every second (default 10)"
    )
    parser.add_argument(
        "--console-journal", type=int, default=1_000_000, help="journal records behind the console's pages (1000000)"
    )
    parser.add_argument(
        "--console-parked", type=int, default=100_000, help="parked entries behind the console's pages (100000)"
    )
    parser.add_argument(
        "--history",
        type=int,
        default=1_000_000,
        help="applied entries behind the shapes' second ledger; 0 skips that ledger (default 1000000)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"also exit non-zero when a ratio is under its target (the shapes: {TARGET}x of the lean bound)",
    )
    return parser.parse_args()


def main() -> None:
    """Run the benchmark and print its table; exit non-zero when results differ, or with --check a ratio is low."""
    args = arguments()
    server, keep_alive = postgres.server_uri()
    with_per_entry = args.entries <= args.per_entry_entries
    big = measure(server, args.entries, args.batch_size, with_per_entry, args.http_seconds, args.rounds)
    small = big if args.entries <= args.per_entry_entries else measure(
        server, args.per_entry_entries, args.batch_size, True, 0)  # fmt: skip
    outcomes = measure_shapes(server, args.entries, args.history, args.batch_size, args.rounds)
    idle_median, idle_max = idle_cycle_ms(server, args.idle_rows)
    latency = [measure_latency(server, notify, args.polling_interval, args.latency_samples) for notify in (True, False)]
    checked = drift_check(server, args.drift_entries)
    lookback = lookback_at_size(server, args.lookback_history, args.lookback_burst, args.lookback_sweep_seconds)
    pages = console_pages(server, args.console_journal, args.console_parked, 20)
    same = len(set(big["snapshots"])) == 1 and len(set(small["snapshots"])) == 1
    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, PostgreSQL on loopback"),
        ("backlog", f"{args.entries:,} completed entries, half withdrawals, 10 per account"),
        ("service", f"{big['service']:,.0f} entries/s (BATCH_SIZE {args.batch_size}; best of {args.rounds})"),
        ("set-based bound", f"{big['set-based bound']:,.0f} entries/s (best of {args.rounds})"),
        ("service / bound", f"{big['service'] / big['set-based bound']:.2f}x (target >= 0.7x)"),
        ("lean bound", f"{big['lean bound']:,.0f} entries/s (the essential writes alone; best of {args.rounds})"),
        ("service / lean bound", f"{big['service'] / big['lean bound']:.2f}x (target >= 0.7x at 1,000,000)"),
        (
            "service, the bound's batch",
            f"{big[BIG_BATCH]:,.0f} entries/s (BATCH_SIZE {BOUND_BATCH}, the bounds' batch; best of {args.rounds})",
        ),
        ("service / lean bound, the bound's batch", f"{big[BIG_BATCH] / big['lean bound']:.2f}x (target >= 0.7x)"),
        ("per-entry loop", f"{small['per-entry loop']:,.0f} entries/s (on its own copy of {small['entries']:,})"),
        (
            "service / per-entry",
            f"{big['service'] / small['per-entry loop']:.1f}x (target >= 20x; the service's rate on the full backlog)",
        ),
        ("service peak RSS", f"{big['service peak RSS MB']:.0f} MB (target < 150 MB at 1M)"),
        ("identical results", "yes" if same else "NO: the approaches disagree"),
        *size_rows(big["sizes"], args.entries),
        ("shapes", description(server, args.entries, args.history)),
        *shape_rows(outcomes),
        (
            "idle cycle",
            f"median {idle_median:.1f} ms, max {idle_max:.1f} ms, {args.idle_rows:,} rows per queue table "
            "(target < 20 ms at 10,000,000)",
        ),
        *http_rows(big),
        *latency_rows(*latency),
        drift_row(checked),
        *lookback_rows(lookback),
        *console_rows(pages),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    del keep_alive
    failed = differing(outcomes) + (low_ratios(outcomes) + main_ratios_low(big, small) if args.check else [])
    if not same or checked["findings"] or failed:
        raise SystemExit("failed: " + "; ".join(failed) if failed else 1)


def main_ratios_low(big: dict[str, Any], small: dict[str, Any]) -> list[str]:
    """Name each ratio of the clustered backlog's rows that is under its target."""
    ratios = [
        ("service / bound", big["service"] / big["set-based bound"], 0.7),
        ("service / lean bound", big["service"] / big["lean bound"], 0.7),
        ("service / lean bound, the bound's batch", big[BIG_BATCH] / big["lean bound"], 0.7),
        ("service / per-entry", big["service"] / small["per-entry loop"], 20),
    ]
    return [f"{name} {ratio:.2f}x < {target}x" for name, ratio, target in ratios if ratio < target]


if __name__ == "__main__":
    main()
