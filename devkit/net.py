"""Loopback helpers: a port that nothing listens on, and waiting until something answers."""

from __future__ import annotations

import socket
import time
import urllib.error
from collections.abc import Callable

import psycopg2


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll until check() is true, taking a connection error for not yet; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, psycopg2.Error):
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
