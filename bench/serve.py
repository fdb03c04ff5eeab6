"""Running an app under gunicorn for the benchmark: its environment, its life, and the service's status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from bench.data import TIERS
from devkit import ROOT


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


@contextmanager
def gunicorn(env: dict[str, str], *args: str) -> Iterator[subprocess.Popen]:
    """Run gunicorn from the project's folder with these arguments until the block ends, then stop it."""
    command = [sys.executable, "-m", "gunicorn", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def status(port: int) -> dict:
    """Read the service's status endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/consistency/status", timeout=5) as answer:
        return json.loads(answer.read())
