"""The service under gunicorn for the benchmark: its environment, and what its status endpoint reports."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from bench.data import TIERS
from devkit.net import wait_until


def service_env(queue_uri: str, portfolio_uri: str, port: int, **settings: str) -> dict[str, str]:
    """Return the environment of the service on two databases and a port, quiet, with any other settings."""
    return {
        **os.environ,
        **TIERS,
        "QUEUE_DB_URI": queue_uri,
        "USER_PORTFOLIO_DB_URI": portfolio_uri,
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
        **settings,
    }


def status(port: int) -> dict:
    """Read the service's status endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/consistency/status", timeout=5) as answer:
        return json.loads(answer.read())


def stored_cycle(port: int, timeout: float, what: str) -> dict[str, Any]:
    """Wait until the worker that answers reports a stored cycle, and return it.

    Each worker keeps what it last read for up to a second, so one may answer None just after another stored
    the first cycle.
    """
    seen: list[Any] = []
    wait_until(lambda: bool(seen.append(status(port).get("last_cycle")) or seen[-1]), timeout, what, interval=0.2)
    return seen[-1]


def worker_peak_rss_mb(master: int) -> float:
    """Return the highest peak RSS among a gunicorn master's workers, in MB."""
    peaks = []
    for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)
