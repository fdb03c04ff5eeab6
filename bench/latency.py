"""python -m bench.latency: time from a COMPLETED commit on queue-db to the portfolio update, NOTIFY on and off."""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions

from bench.data import build_templates
from bench.serve import service_env, status, stored_cycle
from devkit import ROOT, gunicorn, postgres
from devkit.net import free_port, wait_until

NOTIFY_SQL = ROOT / "schema" / "queue_notify.sql"
ACCOUNT = "1000000000"  # the first account of the backlog build_templates makes
BACKLOG = 100  # entries the start-up cycle drains, so that the service starts on real data
PROBE_EVERY = 0.005  # seconds between two reads of the portfolio transaction's status


@contextmanager
def fresh_databases(server: str, notify: bool) -> Iterator[tuple[str, str]]:
    """Build fresh queue-db and user-portfolio-db, with the notify trigger if asked; drop them afterwards."""
    templates = build_templates(server, BACKLOG)
    names = [postgres.clone(server, template) for template in templates]
    try:
        queue_uri, portfolio_uri = (postgres.with_database(server, name) for name in names)
        if notify:
            postgres.apply_schema(queue_uri, NOTIFY_SQL)
        yield queue_uri, portfolio_uri
    finally:
        for name in [*names, *templates]:
            postgres.drop(server, name)


@contextmanager
def service(queue_uri: str, portfolio_uri: str, notify: bool, polling_interval: float, workers: int) -> Iterator[int]:
    """Run the service under gunicorn until its start-up cycle is done; yield its port, then stop it."""
    port = free_port()
    env = service_env(queue_uri, portfolio_uri, port, POLLING_INTERVAL=str(polling_interval),
                      LISTEN_NOTIFY="true" if notify else "false")  # fmt: skip
    with gunicorn.running(gunicorn.command("--workers", str(workers)), env, subprocess.DEVNULL):
        wait_until(lambda: started_up(port), 60, "the service's start-up cycle")
        yield port


def started_up(port: int) -> bool:
    """Tell whether the service's last finished cycle, its start-up one, went through."""
    return (status(port).get("last_cycle") or {}).get("result") == "ok"


def one_sample(queue: psycopg2.extensions.connection, portfolio: psycopg2.extensions.connection) -> float:
    """Queue an investment, commit it COMPLETED, and return the seconds until its transaction is PROCESSED."""
    entry = str(uuid.uuid4())
    with portfolio.cursor() as cur:
        cur.execute("INSERT INTO portfolio_transactions (id, accountid, transaction_type, total_amount)"
                    " VALUES (%s, %s, 'INVEST', 100)", (entry, ACCOUNT))  # fmt: skip
    with queue.cursor() as cur:
        cur.execute("INSERT INTO investment_queue (account_number, tier_1, tier_2, tier_3, uuid)"
                    " VALUES (%s, 10, 20, 30, %s) RETURNING queue_id", (ACCOUNT, entry))  # fmt: skip
        queue_id = cur.fetchone()[0]
    queue.commit()
    with queue.cursor() as cur:
        cur.execute("UPDATE investment_queue SET status = 'COMPLETED', processed_at = now() WHERE queue_id = %s",
                    (queue_id,))  # fmt: skip
    committing = time.monotonic()  # the commit's own round trip counts as latency: a conservative start
    queue.commit()
    with portfolio.cursor() as cur:
        while True:
            cur.execute("SELECT status FROM portfolio_transactions WHERE id = %s", (entry,))
            if cur.fetchone()[0] == "PROCESSED":
                return time.monotonic() - committing
            if time.monotonic() - committing > 120:
                raise SystemExit("an entry was not applied within 120 s")
            time.sleep(PROBE_EVERY)


def measure_latency(
    server_uri: str, notify: bool, polling_interval: float = 1.0, samples: int = 30, workers: int = 2
) -> dict[str, float | int | bool]:
    """Measure commit-to-portfolio latency on fresh databases under gunicorn; return median, p90 and context."""
    rng = random.Random()
    latencies, cycles = [], []
    with (
        fresh_databases(server_uri, notify) as (queue_uri, portfolio_uri),
        service(queue_uri, portfolio_uri, notify, polling_interval, workers) as port,
    ):
        queue, portfolio = psycopg2.connect(queue_uri), psycopg2.connect(portfolio_uri)
        portfolio.autocommit = True
        try:
            for _ in range(samples):
                # Random spacing: the commits land anywhere in the polling interval, not in step with it.
                time.sleep(rng.uniform(0.1, 0.1 + polling_interval))
                latencies.append(one_sample(queue, portfolio))
                cycles.append(stored_cycle(port, 30, "a stored cycle")["duration_ms"])
        finally:
            queue.close()
            portfolio.close()
    ms = sorted(1000 * s for s in latencies)
    return {
        "notify": notify,
        "polling_interval_ms": 1000 * polling_interval,
        "workers": workers,
        "samples": samples,
        "median_ms": statistics.median(ms),
        "p90_ms": statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0],
        "max_ms": ms[-1],
        "cycle_ms": statistics.median(cycles),
    }


def report(on: dict, off: dict) -> list[tuple[str, str, str]]:
    """Return the table rows: the figures side by side, and each side's target with whether it is met."""
    bound = off["polling_interval_ms"] + off["cycle_ms"]
    return [
        ("", "with notifications", "without"),
        ("median", f"{on['median_ms']:.0f} ms", f"{off['median_ms']:.0f} ms"),
        ("p90", f"{on['p90_ms']:.0f} ms", f"{off['p90_ms']:.0f} ms"),
        ("max", f"{on['max_ms']:.0f} ms", f"{off['max_ms']:.0f} ms"),
        ("typical cycle", f"{on['cycle_ms']:.0f} ms", f"{off['cycle_ms']:.0f} ms"),
        ("target (median)", "< 250 ms", f"<= POLLING_INTERVAL + one cycle = {bound:.0f} ms"),
        ("met", "yes" if on["median_ms"] < 250 else "NO", "yes" if off["median_ms"] <= bound else "NO"),
    ]


def main() -> None:
    """Measure with and without notifications and print them side by side."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=30, help="commits measured per mode (default 30)")
    parser.add_argument("--polling-interval", type=float, default=1.0, help="POLLING_INTERVAL (default 1.0)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2, as shipped)")
    args = parser.parse_args()
    server, keep_alive = postgres.server_uri()
    on = measure_latency(server, True, args.polling_interval, args.samples, args.workers)
    off = measure_latency(server, False, args.polling_interval, args.samples, args.workers)
    print(f"{args.samples} commits per mode, POLLING_INTERVAL {args.polling_interval:g} s, --workers {args.workers}")
    rows = report(on, off)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |")
    del keep_alive
    if not (on["median_ms"] < 250 and off["median_ms"] <= off["polling_interval_ms"] + off["cycle_ms"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
