"""HTTP latency under load, measured with wrk (Debian's package) while the service drains a backlog."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "wrk.lua"
CONNECTIONS = 100
PACE_MS = 100  # paced load: each connection waits 0-200 ms between requests, about 1,000 requests/s in all


@dataclass(frozen=True)
class Load:
    """What one wrk run saw."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        """Return the requests answered per second."""
        return self.requests / self.seconds


def available() -> bool:
    """Tell whether wrk is installed."""
    return shutil.which("wrk") is not None


def wrk(url: str, seconds: int, paced: bool) -> Load:
    """Run wrk with 100 connections against one URL and return what it measured."""
    command = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", str(SCRIPT), url]
    env = {**os.environ, "WRK_PACE_MS": str(PACE_MS if paced else 0)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    figures = dict(re.findall(r"^bench (\w+) ([\d.]+)", out, re.MULTILINE))
    if "p99" not in figures:
        raise RuntimeError(f"wrk printed no percentiles:\n{out}")
    return Load(
        int(figures["requests"]),
        int(figures["errors"]),
        float(figures["seconds"]),
        float(figures["p50"]),
        float(figures["p99"]),
    )
