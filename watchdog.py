"""The connection watchdog: it ends a wait for an answer that will not come, where TCP cannot tell.

A peer whose kernel still acknowledges while nothing comes back (a proxy that forwards nothing, a hung server)
answers every keepalive probe and acknowledges every request, so neither keepalives nor tcp_user_timeout end a
call that waits on it. The watchdog looks at the connections in use from a thread of its own and shuts down
those that wait in vain, which ends the blocked call with an error.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import suppress

import psycopg2
import psycopg2.extensions

from queries import query

log = logging.getLogger(__name__)

# A connection that sent a request and has had no answer for ANSWER_WAIT seconds makes the watchdog ask, on a new
# connection, whether its database answers within DB_CONNECT_TIMEOUT; if not, the waiting connections are dropped.
# So a request on a dead way ends within ANSWER_WAIT + WATCH_EVERY + DB_CONNECT_TIMEOUT (11 s by default), and any
# request the server cannot have seen, within DB_STATEMENT_TIMEOUT + ANSWER_WAIT + WATCH_EVERY.
ANSWER_WAIT = 5.0
WATCH_EVERY = 0.5

_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)  # Linux; elsewhere only TCP's own bounds apply


def last_data(sock: socket.socket) -> tuple[float, float]:
    """Return how many seconds ago a TCP socket last sent data, and last received some, as its kernel tells."""
    if _TCP_INFO is None:
        return 0.0, 0.0
    info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    # struct tcp_info: eight one-byte fields, then 32-bit ones; the 10th is tcpi_last_data_sent and the 12th
    # tcpi_last_data_recv, each in milliseconds ago.
    fields: tuple[int, ...] = struct.unpack_from("=8x13I", info)
    return fields[9] / 1000, fields[11] / 1000


class WatchedConnection(psycopg2.extensions.connection):
    """A connection that the watchdog may watch: closing it stops the watch first, so that no look overlaps it."""

    watchdog: Watchdog | None = None

    def close(self) -> None:
        """Stop the watch, then close."""
        if self.watchdog is not None:
            self.watchdog.unwatch(self)
        super().close()


class _Watched:
    """A connection in use, with a duplicate of its socket, to read and shut down while its thread waits on it."""

    def __init__(self, conn: WatchedConnection, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock

    def look(self) -> tuple[float, float]:
        """Return the seconds a command in progress has gone without a byte either way (0 if none is in progress),
        and the seconds since the server last sent anything.

        Call it under the watchdog's lock: the connection cannot be closed meanwhile.
        """
        try:
            if self.conn.closed:
                return 0.0, 0.0
            sent, received = last_data(self.sock)
            busy = self.conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_ACTIVE
        except (OSError, psycopg2.Error):
            return 0.0, 0.0
        return min(sent, received) if busy else 0.0, received

    def drop(self) -> None:
        """Shut the socket down: the call that waits on it ends with an error, and the pool discards it."""
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Drops the connections of one database that wait for an answer that will not come, and says so once.

    Every WATCH_EVERY seconds it looks at the connections in use: one waits for an answer when libpq has a command
    in progress on it and its socket has carried no data either way since (read from the kernel, so that every call
    of the driver is covered, the listener's select() too). When one has waited ANSWER_WAIT seconds, a probe
    connects anew and pings: an answer within `probe_wait` means the database works and the statement is merely long
    (the next probe comes ANSWER_WAIT later at the soonest); none means the way to it is dead, and every connection
    that waited since before the probe is shut down. A connection that waits `overdue_after` seconds is shut down
    whatever the probe says: the server would have ended any statement and said so by then, so its request or the
    answer was lost on the way (a proxy that dropped it, say, and then forwarded again).
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], psycopg2.extensions.connection],
        probe_wait: float,
        overdue_after: float,
        describe: Callable[[Exception], str],
    ) -> None:
        self._name = name
        self._connect = connect
        self._probe_wait = probe_wait
        self._overdue_after = overdue_after
        self._describe = describe
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._answered_at = float("-inf")  # when a probe last got an answer
        self._failing = False  # a spell of dropped connections is logged once

    def watch(self, conn: psycopg2.extensions.connection) -> None:
        """Watch a connection from now on, until it is closed or unwatched; called by the thread that uses it."""
        if _TCP_INFO is None or not isinstance(conn, WatchedConnection):
            return
        try:
            sock = socket.socket(fileno=os.dup(conn.fileno()))
        except (psycopg2.Error, OSError):
            return  # closed already: its next use says so
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            sock.close()  # a Unix-domain socket cannot be cut off from its server
            return
        conn.watchdog = self
        with self._lock:
            self._watched[id(conn)] = _Watched(conn, sock)
            if self._thread is None and not self._stopping.is_set():
                # The thread holds the watchdog weakly: a Database dropped without close() stops it too.
                watching = (weakref.ref(self), self._stopping)
                name = f"watchdog-{self._name}"
                self._thread = threading.Thread(target=_keep_watching, args=watching, name=name, daemon=True)
                self._thread.start()

    def unwatch(self, conn: psycopg2.extensions.connection) -> None:
        """Stop watching a connection, before it is closed or goes back to the pool."""
        with self._lock:
            watched = self._watched.pop(id(conn), None)
        if watched is not None:
            watched.sock.close()

    def stop(self) -> None:
        """Stop the thread and forget every connection; safe to call twice."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._probe_wait + 1)
        with self._lock:
            watched, self._watched = list(self._watched.values()), {}
        for each in watched:
            each.sock.close()

    def tick(self) -> None:
        """Check once; whatever goes wrong, the watch goes on."""
        try:
            self.check()
        except Exception:
            log.exception("%s: the connection watchdog failed once; it goes on", self._name)

    def check(self) -> int:
        """Look at the connections in use once; drop those that wait in vain; return how many were dropped."""
        waits = self._waits()
        overdue = [(each, waited) for each, waited in waits if waited >= self._overdue_after]
        if overdue:
            return self._drop(overdue, f"longer than any statement may run, {self._overdue_after:g}s")
        longest = max((waited for _, waited in waits), default=0.0)
        if longest < ANSWER_WAIT or time.monotonic() - self._answered_at < ANSWER_WAIT:
            return 0
        started = time.monotonic()
        problem = self._probe()
        if problem is None:
            self._answered_at = started
            return 0
        # Only those that waited since before the probe: another may have sent its request just now.
        since = time.monotonic() - started + ANSWER_WAIT - WATCH_EVERY
        return self._drop([(each, waited) for each, waited in self._waits() if waited >= since], problem)

    def _drop(self, dropped: list[tuple[_Watched, float]], why: str) -> int:
        """Shut connections down, and log it once a spell; return how many."""
        for each, _ in dropped:
            each.drop()
        if dropped:
            longest = max(waited for _, waited in dropped)
            level = logging.DEBUG if self._failing else logging.WARNING
            message = "%s gave no answer for %.1fs on %d connection(s) (%s): dropping them"
            log.log(level, message, self._name, longest, len(dropped), why)
            self._failing = True
        return len(dropped)

    def _waits(self) -> list[tuple[_Watched, float]]:
        """Every watched connection, with how long it has waited for an answer; ends a spell when one is answered."""
        with self._lock:
            looks = [(each, *each.look()) for each in self._watched.values()]
        if self._failing and any(received < WATCH_EVERY for _, _, received in looks):
            log.info("%s answers again", self._name)
            self._failing = False
        return [(each, waited) for each, waited, _ in looks]

    def _probe(self) -> str | None:
        """Connect anew and ping, in a thread of its own; return None if the database answered in time, else why not."""
        outcome: dict[str, str] = {}
        answered = threading.Event()

        def probe() -> None:
            try:
                conn = self._connect()
                try:
                    self.watch(conn)  # a probe that hangs after connecting is dropped by a later check
                    with conn.cursor() as cur:
                        cur.execute(query("ping"))
                    answered.set()
                finally:
                    conn.close()
            except Exception as err:  # whatever it is, the check says so
                outcome["error"] = self._describe(err)
                if "FATAL" in outcome["error"]:
                    answered.set()  # the server itself refused it (too many clients, say): it answers
            finally:
                outcome.setdefault("error", "")

        threading.Thread(target=probe, name=f"probe-{self._name}", daemon=True).start()
        deadline = time.monotonic() + self._probe_wait
        while not answered.wait(0.05) and "error" not in outcome and time.monotonic() < deadline:
            pass
        if answered.is_set():
            return None
        return "nor to a new connection: " + (outcome.get("error") or f"none within {self._probe_wait:g}s")


def _keep_watching(watchdog: weakref.ref[Watchdog], stopping: threading.Event) -> None:
    """Check every WATCH_EVERY seconds until stopped, or until nothing holds the watchdog any more."""
    while not stopping.wait(WATCH_EVERY):
        held = watchdog()
        if held is None:
            return
        held.tick()
        del held
