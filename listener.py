"""The thread that LISTENs on queue-db and wakes the poller as soon as queue entries settle."""

from __future__ import annotations

import logging
import random
import select
import socket
import threading
from collections.abc import Callable
from contextlib import suppress

import psycopg2.extensions

from db import APPLICATION_NAME, Database, DatabaseError, first_line
from queries import query

log = logging.getLogger(__name__)

# Named apart from the pooled sessions, so that pg_stat_activity tells the listener from the cycle's sessions.
LISTENER_NAME = f"{APPLICATION_NAME}-listener"
# Waits between reconnection attempts double from the first to the last. Each is shortened by up to a
# quarter at random, so that the workers of every replica do not all knock at once after a restart.
RETRY_FIRST = 1.0
RETRY_LAST = 30.0
# After this many seconds without a word from queue-db the listener pings it: a request that gets no answer is what
# the pool's watchdog notices (watchdog.py), where a silent connection would go on waiting for notifications that
# cannot come. So a dead listening connection is noticed within this plus the watchdog's bound.
PING_AFTER = 4.0


class Listener:
    """Calls `wake` on every notification from queue-db; reconnects with backoff and never raises."""

    def __init__(self, database: Database, wake: Callable[[], None]) -> None:
        self._database = database
        self._wake = wake
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # stop() writes to the second socket to end the thread's select() at once.
        self._bell: tuple[socket.socket, socket.socket] | None = None
        self._failures = 0
        self.listening = threading.Event()

    def start(self) -> None:
        """Start the thread; it connects and LISTENs in the background."""
        if self.is_alive():
            return
        self._stopping.clear()
        self._bell = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, args=(self._bell,), name="queue-listener", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and wait for the thread; safe from any thread, any time."""
        self._stopping.set()
        if self._bell is not None:
            with suppress(OSError):  # the thread has ended and closed it already
                self._bell[1].send(b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        """Tell whether the listener thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self, bell: tuple[socket.socket, socket.socket]) -> None:
        """Listen until stopped, reconnecting after every failure."""
        try:
            while not self._stopping.is_set():
                self._session(bell[0])
        finally:
            for sock in bell:
                sock.close()

    def _session(self, bell: socket.socket) -> None:
        """Connect and listen until stopped; on a failure, log it and wait before the next attempt."""
        try:
            conn = self._database.dedicated(LISTENER_NAME)
        except DatabaseError as err:
            self._failed(err.detail)
            return
        try:
            self._listen(conn, bell)
        except Exception as err:  # the thread must outlive any failure: polling goes on without it meanwhile
            self._failed(self._database.redact(first_line(err)))
        finally:
            self.listening.clear()
            conn.close()

    def _listen(self, conn: psycopg2.extensions.connection, bell: socket.socket) -> None:
        """LISTEN, then wake the poller on every batch of notifications until stopped or disconnected."""
        with conn.cursor() as cur:
            cur.execute(query("listen_queue"))
        self.listening.set()
        if self._failures:
            log.info("listening to queue-db notifications again")
            self._failures = 0
        # Entries that settled while nobody listened notified no one: have the poller look once now.
        self._wake()
        while not self._stopping.is_set():
            readable, _, _ = select.select([conn.fileno(), bell.fileno()], [], [], PING_AFTER)
            if not readable:
                with conn.cursor() as cur:
                    cur.execute(query("ping"))
            elif conn.fileno() in readable:
                conn.poll()
            if conn.notifies:
                conn.notifies.clear()  # however many arrived, one wake-up covers them all
                self._wake()

    def _failed(self, detail: str) -> None:
        """Log the first failure in a row (later ones at DEBUG only), then wait before the next attempt."""
        level = logging.WARNING if self._failures == 0 else logging.DEBUG
        log.log(level, "queue-db notifications unavailable, polling continues; retrying: %s", detail)
        delay = min(RETRY_LAST, RETRY_FIRST * 2 ** min(self._failures, 10))
        self._failures += 1
        self._stopping.wait(delay * random.uniform(0.75, 1.0))  # noqa: S311 - jitter, not a secret
