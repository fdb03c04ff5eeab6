"""A drift check at scale: the service drains a backlog, then one check walks it all; its time and rows read.

python -m bench.drift runs this part alone.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import config
import drift
import service
from bench.data import TIERS, build_templates
from devkit import postgres


def drift_check(server: str, entries: int) -> dict[str, Any]:
    """Drain a backlog of `entries` with the service in this process, then time one drift check over it."""
    names = build_templates(server, entries)
    quri, puri = (postgres.with_database(server, name) for name in names)
    env = {**TIERS, "QUEUE_DB_URI": quri, "USER_PORTFOLIO_DB_URI": puri, "DRIFT_CHECK_INTERVAL": "0"}
    svc = service.build_service(config.load_settings({**env, "LOG_LEVEL": "WARNING"}))
    try:
        svc.runner.prepare()
        drained = svc.poller.run_once().to_json()
        if drained["result"] != "ok" or sum(c["read"] for c in drained["counts"].values()) != entries:
            raise RuntimeError(f"the drain did not read the {entries} entries: {drained}")
        time.sleep(1.1)  # the stored watermarks trail the horizon by a second: let them pass every entry
        svc.poller.run_once()
        svc.drift.request("bench", "benchmark")
        started = time.perf_counter()
        if svc.drift.run_due() is None:
            raise RuntimeError("the drift check did not run")
        seconds = time.perf_counter() - started
        report = svc.drift.latest() or {}
    finally:
        svc.close()
        for name in names:
            postgres.drop(server, name)
    if report.get("state") != "done":
        raise RuntimeError(f"the drift check did not finish: {report}")
    return {
        "entries": entries,
        "seconds": seconds,
        "rows_read": report["rows_read"],
        "findings": sum(report["counts"].values()),
    }


def drift_row(result: dict[str, Any]) -> tuple[str, str]:
    """Describe a drift check's time and rows read as a row of the benchmark's table."""
    rate = result["rows_read"] / result["seconds"]
    return (
        "drift check",
        f"{result['seconds']:.1f} s over {result['entries']:,} applied entries: {result['rows_read']:,} rows read "
        f"({rate:,.0f} rows/s), {result['findings']} findings; chunks of {drift.CHUNK_SIZE:,} rows, each its own "
        f"transaction, {drift.PAUSE * 1000:.0f} ms apart",
    )


def main() -> None:
    """Time one drift check over a drained backlog and print its row."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000, help="backlog size (default 1000000)")
    args = parser.parse_args()
    server, keep_alive = postgres.server_uri()
    name, value = drift_row(drift_check(server, args.entries))
    print(f"| {name} | {value} |")
    del keep_alive


if __name__ == "__main__":
    main()
