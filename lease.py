"""The cycle lease: which process may apply, for how long, and the fence every transaction of its cycle passes.

See sql/migrations/0008_cycle_lease.sql. A process takes the lease for one cycle and gives it back at the end.
One that stops (SIGSTOP, a long pause, a partition) loses it CYCLE_LEASE seconds after its last renewal, or
sooner when the server ends its session, and its next transaction fails at the fence, before it writes.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions

from db import in_transaction, one_row
from queries import query

Connection = psycopg2.extensions.connection
Cursor = psycopg2.extensions.cursor


class Tenure:
    """When each lease this process holds was last renewed, by this process's own clock: what liveness reads.

    Noted where the lease is taken and at every fence, forgotten when it is given back; a lease whose connection
    has closed is not held any more (its session is gone, which frees it at once).
    """

    def __init__(self) -> None:
        self._renewed: dict[tuple[int, int], tuple[Connection, float]] = {}  # by connection and epoch
        self._lock = threading.Lock()

    def renewed(self, conn: Connection, epoch: int) -> None:
        """Note that this process has just renewed, or taken, the lease of `epoch` on this connection."""
        with self._lock:
            self._renewed[id(conn), epoch] = (conn, time.monotonic())

    def ended(self, conn: Connection, epoch: int) -> None:
        """Forget a lease given back, or lost."""
        with self._lock:
            self._renewed.pop((id(conn), epoch), None)

    def unrenewed_for(self) -> float:
        """Seconds since the lease this process holds was last renewed; 0 when it holds none."""
        with self._lock:
            for key in [key for key, (conn, _) in self._renewed.items() if conn.closed]:
                del self._renewed[key]
            held = [at for _, at in self._renewed.values()]
        return time.monotonic() - min(held) if held else 0.0


# The leases this process holds: one at a time, as a rule, but a cycle that lost its lease may overlap the next.
HELD = Tenure()


def this_process() -> str:
    """Name this process as the lease records it: host, replica (the gunicorn master) and pid."""
    return f"{socket.gethostname()}:{os.getppid()}:{os.getpid()}"


def this_replica() -> str:
    """The prefix of the names of this replica's processes: its host and its gunicorn master."""
    return f"{socket.gethostname()}:{os.getppid()}:"


@dataclass(frozen=True)
class Lease:
    """The lease one cycle holds, on the connection that cycle writes through."""

    conn: Connection
    epoch: int
    seconds: float

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """A transaction of the cycle: it renews the lease first, or fails there if another process holds it."""
        with in_transaction(self.conn) as cur:
            cur.execute(query("fence_cycle_lease"), {"epoch": self.epoch, "seconds": self.seconds})
            HELD.renewed(self.conn, self.epoch)
            yield cur


@dataclass(frozen=True)
class Holder:
    """Who held the lease when a process last tried to take it, and how many seconds before it was renewed."""

    name: str
    renewed_s: float

    def stalled(self, seconds: float) -> bool:
        """Tell whether the holder had gone without renewing a lease of `seconds` for more than a quarter of it.

        A quarter: sooner than the server ends a frozen holder's open transaction (at half), which frees the lease.
        """
        return self.renewed_s > seconds / 4


@dataclass(frozen=True)
class Stored:
    """The lease as stored, read at one time: its holder, its epoch, and its times by user-portfolio-db's clock.

    The holder is None when the lease was given back, or when the holder's session is gone, which frees it. The times
    are the seconds since the last renewal and until the lease expires.
    """

    holder: str | None
    epoch: int
    renewed_s: float = 0.0
    expires_in_s: float = 0.0  # below 0: expired, free for the next poll of any process

    def to_json(self, age: float) -> dict[str, Any]:
        """Show the lease as the status endpoint does, `age` seconds after it was read."""
        held = self.holder is not None
        return {
            "holder": self.holder,
            "epoch": self.epoch,
            "renewed_s_ago": round(self.renewed_s + age, 3) if held else None,
            "expires_in_s": round(self.expires_in_s - age, 3) if held else None,
        }


def take(conn: Connection, seconds: float, fresh_for: float, wait: float) -> tuple[Lease | None, Holder | None]:
    """Take the lease for a cycle, unless a cycle started within fresh_for seconds; wait up to `wait` for a holder.

    Returns the lease, or None and the process that holds it (None when it is free but a cycle is too recent).
    """
    deadline = time.monotonic() + wait
    params = {"holder": this_process(), "seconds": seconds, "fresh_for": fresh_for}
    while True:
        with in_transaction(conn) as cur:
            cur.execute(query("take_cycle_lease"), params)
            epoch, holder, renewed_s = one_row(cur)
        if epoch is not None:
            HELD.renewed(conn, epoch)
            return Lease(conn, epoch, seconds), None
        if time.monotonic() >= deadline:
            return None, None if holder is None else Holder(holder, float(renewed_s))
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def give(lease: Lease) -> None:
    """Give the lease back at the end of a cycle, unless its connection is already gone (the lease then expires)."""
    try:
        if lease.conn.closed:
            return
        with in_transaction(lease.conn) as cur:
            cur.execute(query("give_cycle_lease"), {"epoch": lease.epoch})
    finally:
        HELD.ended(lease.conn, lease.epoch)
