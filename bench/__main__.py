"""python -m bench: drain one backlog three ways, check they agree, and print entries/s, ratios and memory."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.approaches import per_entry, set_based
from bench.data import TIERS, build_templates, snapshot
from tests import pgtest

ROOT = Path(__file__).resolve().parent.parent


def fresh_copy(server: str, templates: tuple[str, str]) -> tuple[str, str, list[str]]:
    """Clone the backlog's databases; return their URIs and names."""
    names = [pgtest.clone(server, template) for template in templates]
    return pgtest.with_database(server, names[0]), pgtest.with_database(server, names[1]), names


def worker_peak_rss_mb(master: int) -> float:
    """Return the highest peak RSS among a gunicorn master's workers, in MB."""
    peaks = []
    for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


def run_service(queue_uri: str, portfolio_uri: str, batch_size: int) -> tuple[float, float]:
    """Start the service under gunicorn; its start-up cycle drains the backlog. Return seconds and peak RSS."""
    port = pgtest.free_port()
    env = {
        **os.environ,
        **TIERS,
        "QUEUE_DB_URI": queue_uri,
        "USER_PORTFOLIO_DB_URI": portfolio_uri,
        "PORT": str(port),
        "POLLING_INTERVAL": "3600",
        "BATCH_SIZE": str(batch_size),
        "LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "gunicorn", "consistency_manager_svc:app", "--workers", "1"]
    service = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/consistency/status", timeout=5) as r:
                    last = json.loads(r.read()).get("last_cycle")
            except OSError:
                continue
            if last and last["result"] == "ok":
                return last["duration_ms"] / 1000, worker_peak_rss_mb(service.pid)
        raise SystemExit("the service did not finish draining")
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)


def measure(server: str, entries: int, batch_size: int, with_per_entry: bool) -> dict[str, object]:
    """Drain a backlog of `entries` with each approach on fresh copies; return rates and fingerprints."""
    templates = build_templates(server, entries)
    results: dict[str, object] = {"entries": entries}
    runs = [("service", None), ("set-based bound", set_based)]
    if with_per_entry:
        runs.append(("per-entry loop", per_entry))
    try:
        for name, approach in runs:
            queue_uri, portfolio_uri, names = fresh_copy(server, templates)
            try:
                if approach is None:
                    seconds, results["service peak RSS MB"] = run_service(queue_uri, portfolio_uri, batch_size)
                else:
                    seconds = approach(queue_uri, portfolio_uri, TIERS)
                results[name] = entries / seconds
                results[f"{name} snapshot"] = snapshot(portfolio_uri)
            finally:
                for dbname in names:
                    pgtest.drop(server, dbname)
    finally:
        for template in templates:
            pgtest.drop(server, template)
    return results


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000, help="backlog size (default 100000)")
    parser.add_argument(
        "--per-entry-entries",
        type=int,
        default=20_000,
        help="backlog for the slow per-entry loop, run on its own smaller copy (default 20000)",
    )
    parser.add_argument("--batch-size", type=int, default=5000, help="the service's BATCH_SIZE (default 5000)")
    args = parser.parse_args()
    server, keep_alive = pgtest.server_uri()
    big = measure(server, args.entries, args.batch_size, with_per_entry=args.entries <= args.per_entry_entries)
    small = big if args.entries <= args.per_entry_entries else measure(
        server, args.per_entry_entries, args.batch_size, with_per_entry=True)  # fmt: skip
    same = big["service snapshot"] == big["set-based bound snapshot"] and (
        small["service snapshot"] == small["per-entry loop snapshot"])  # fmt: skip
    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, PostgreSQL on loopback"),
        ("backlog", f"{args.entries} completed entries, half withdrawals, 10 per account"),
        ("service", f"{big['service']:,.0f} entries/s (BATCH_SIZE {args.batch_size})"),
        ("set-based bound", f"{big['set-based bound']:,.0f} entries/s"),
        ("service / bound", f"{big['service'] / big['set-based bound']:.2f}x (target >= 0.7x)"),
        ("per-entry loop", f"{small['per-entry loop']:,.0f} entries/s (on {small['entries']} entries)"),
        ("service / per-entry", f"{small['service'] / small['per-entry loop']:.1f}x (target >= 20x)"),
        ("service peak RSS", f"{big['service peak RSS MB']:.0f} MB (target < 150 MB at 1M)"),
        ("identical results", "yes" if same else "NO: the approaches disagree"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    del keep_alive
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
