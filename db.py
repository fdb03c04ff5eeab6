"""The two connection pools, and the transaction helpers every caller goes through."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions
import psycopg2.pool

import metrics
from config import Settings
from logs import mask_uri
from queries import query
from watchdog import ANSWER_WAIT, Watchdog, WatchedConnection

log = logging.getLogger(__name__)

# How the service's sessions are named in pg_stat_activity.
APPLICATION_NAME = "consistency-manager-svc"
# TCP's bounds on every connection, on both ends: a path that loses every packet is noticed within 11 s. Idle or
# waiting for an answer, keepalive probes start after 5 s without a word, every 2 s, and the connection is given up
# at the first probe past TCP_USER_TIMEOUT (10 s); sending, it is given up when data stays unacknowledged that long.
KEEPALIVES_IDLE = 5
KEEPALIVES_INTERVAL = 2
KEEPALIVES_COUNT = 3
TCP_USER_TIMEOUT_MS = 10_000


class DatabaseError(Exception):
    """A database could not be reached, or a statement on it failed."""

    def __init__(self, database: str, message: str) -> None:
        super().__init__(f"{database}: {message}")
        self.database = database
        self.detail = message


def pg_array(values: Iterable[object]) -> str:
    """Write values as one PostgreSQL array literal, cast in SQL with ::type[].

    psycopg2 sends a list as ARRAY[...] with one constant per element, which the server parses one by
    one; a single literal is read in one go, several times faster for batch-sized arrays.
    """
    return "{" + ",".join(map(_array_element, values)) + "}"


def _array_element(value: object) -> str:
    """Quote one array element, or write NULL."""
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    if '"' in text or "\\" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _ignore(change: int) -> None:
    """Take no note of a pool's lending."""


def connect_options(settings: Settings, application_name: str = APPLICATION_NAME, utc: bool = True) -> dict[str, Any]:
    """Return the options of every connection the service opens: timeouts, keepalives, its name and time zone.

    utc=False keeps the server's TimeZone, which the queue writers' CURRENT_TIMESTAMP follows: a queue
    column without a time zone is then read as they wrote it.
    """
    timezone = " -c timezone=UTC" if utc else ""
    # A frozen process's open transaction keeps the cycle lease locked: the server ends it within half the lease,
    # which frees the lease for another process.
    idle_ms = int(settings.cycle_lease * 1000 / 2)
    return {
        "connect_timeout": settings.db_connect_timeout,
        "application_name": application_name,
        "keepalives": 1,
        "keepalives_idle": KEEPALIVES_IDLE,
        "keepalives_interval": KEEPALIVES_INTERVAL,
        "keepalives_count": KEEPALIVES_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        # No JIT: the apply's statements are planned again for every batch (its ANALYZE), and JIT would compile
        # them again for every batch too. The server's side of the connection gets the same TCP bounds, so that it
        # ends the session of a client it lost, and the locks that session holds, as soon.
        "options": (
            f"-c jit=off -c statement_timeout={int(settings.db_statement_timeout * 1000)}"
            f" -c lock_timeout={int(settings.db_lock_timeout * 1000)}"
            f" -c idle_in_transaction_session_timeout={idle_ms} -c datestyle=ISO{timezone}"
            f" -c tcp_keepalives_idle={KEEPALIVES_IDLE} -c tcp_keepalives_interval={KEEPALIVES_INTERVAL}"
            f" -c tcp_keepalives_count={KEEPALIVES_COUNT} -c tcp_user_timeout={TCP_USER_TIMEOUT_MS}"
        ),
    }


class _LazyPool(psycopg2.pool.ThreadedConnectionPool):
    """A psycopg2 pool that connects only when asked, yet keeps returned connections for reuse."""

    def __init__(self, size: int, **connect_kwargs: object) -> None:
        super().__init__(0, size, **connect_kwargs)  # no connection at start: the database may be down
        # psycopg2 closes every returned connection beyond minconn; keep up to `size` of them instead.
        self.minconn = size


class Database:
    """A psycopg2 pool for one database that hands out connections and transactions."""

    def __init__(
        self,
        name: str,
        uri: str,
        settings: Settings,
        on_lend: Callable[[int], None] | None = None,
        utc: bool = True,
    ) -> None:
        self.name = name
        # Told +1 when a connection is lent and -1 when it comes back: the pool's in-use metric.
        self._on_lend = on_lend or _ignore
        self.uri = uri
        self._password = urlsplit(uri).password or ""
        self._slots = threading.BoundedSemaphore(settings.db_pool_size)
        self._wait = float(settings.db_connect_timeout)
        # Every connection may be watched; a test may count statements through a class of its own instead.
        self._options = {"connection_factory": WatchedConnection, **connect_options(settings, utc=utc)}
        self._pool = _LazyPool(settings.db_pool_size, dsn=uri, **self._options)
        # libpq waits at least 2 s to connect, whatever connect_timeout says.
        probe_wait = float(max(2, settings.db_connect_timeout))
        overdue_after = settings.db_statement_timeout + ANSWER_WAIT
        self.watchdog = Watchdog(name, self._probe_connection, probe_wait, overdue_after, self.describe)

    def describe(self, err: Exception) -> str:
        """Describe an error of this database in one line, without any credential."""
        return self.redact(first_line(err))

    def redact(self, text: str) -> str:
        """Remove this database's password, and any URI password, from a message."""
        if self._password:
            text = text.replace(self._password, "***")
        return mask_uri(text)

    @contextmanager
    def connection(self, autocommit: bool = False) -> Iterator[psycopg2.extensions.connection]:
        """Lend a pooled connection; discard it if it broke, and turn driver errors into DatabaseError."""
        if not self._slots.acquire(timeout=self._wait):
            raise DatabaseError(self.name, f"no free connection within {self._wait:g}s")
        conn = None
        try:
            conn = self._pool.getconn()
            self._on_lend(1)
            self.watchdog.watch(conn)
            conn.autocommit = autocommit
            yield conn
        except psycopg2.Error as err:
            if conn is not None and not raised_by(err, conn):
                raise  # another database's connection failed: the block that holds it says which
            metrics.observe_db_error(self.name)
            raise DatabaseError(self.name, self.redact(first_line(err))) from err
        finally:
            if conn is not None:
                self._release(conn, bool(conn.closed))
                self._on_lend(-1)
            self._slots.release()

    def _release(self, conn: psycopg2.extensions.connection, broken: bool) -> None:
        """Return a connection to the pool in a clean state, or close it if it cannot be trusted."""
        if not broken:
            try:
                conn.rollback()
                conn.autocommit = False
            except psycopg2.Error:
                broken = True
        self.watchdog.unwatch(conn)
        self._pool.putconn(conn, close=broken)

    def dedicated(self, application_name: str) -> psycopg2.extensions.connection:
        """Open a connection outside the pool, in autocommit mode, with the pool's options; the caller closes it.

        The watchdog watches it until it is closed.
        """
        try:
            conn: psycopg2.extensions.connection = psycopg2.connect(
                self.uri, **{**self._options, "application_name": application_name}
            )
        except psycopg2.Error as err:
            raise DatabaseError(self.name, self.redact(first_line(err))) from err
        conn.autocommit = True
        self.watchdog.watch(conn)
        return conn

    def _probe_connection(self) -> psycopg2.extensions.connection:
        """Open a connection for the watchdog's probe: is the database there at all?"""
        conn: psycopg2.extensions.connection = psycopg2.connect(
            self.uri, **{**self._options, "application_name": f"{APPLICATION_NAME}-probe"}
        )
        conn.autocommit = True
        return conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        """Run the block in one transaction on a pooled connection."""
        with self.connection() as conn, in_transaction(conn) as cur:
            yield cur

    def close(self) -> None:
        """Stop the watchdog and close every pooled connection; safe to call twice."""
        self.watchdog.stop()
        if not self._pool.closed:
            self._pool.closeall()


def raised_by(err: psycopg2.Error, conn: psycopg2.extensions.connection) -> bool:
    """Tell whether a driver error came from this connection: its cursor's, its commit, or its loss."""
    source = getattr(err, "connection", None) or (err.cursor.connection if err.cursor is not None else None)
    return source is conn if source is not None else bool(conn.closed)


@contextmanager
def in_transaction(conn: psycopg2.extensions.connection) -> Iterator[psycopg2.extensions.cursor]:
    """Run the block in one transaction on a held connection: commit on success, roll back on error."""
    try:
        with conn.cursor() as cur:
            yield cur
        try:
            conn.commit()
        except psycopg2.Error as err:
            err.connection = conn  # type: ignore[attr-defined]  # a commit's error has no cursor to tell
            raise
    except BaseException:
        if not conn.closed:
            # The original error says more than a failed rollback on a broken connection.
            with suppress(psycopg2.Error):
                conn.rollback()
        raise


def one_row(cur: psycopg2.extensions.cursor) -> tuple[Any, ...]:
    """Return the row of a statement that always yields exactly one, such as a SELECT of aggregates."""
    row = cur.fetchone()
    if row is None:
        raise psycopg2.ProgrammingError("the statement returned no row")
    return row


def json_rows(cur: psycopg2.extensions.cursor) -> list[dict[str, Any]]:
    """Return the rows a statement left as JSON objects named by its columns, values shown faithfully."""
    columns = [c.name for c in cur.description or ()]
    return [dict(zip(columns, map(plain, row), strict=True)) for row in cur.fetchall()]


def plain(value: Any) -> Any:
    """Turn a database value into something JSON shows faithfully: times in ISO 8601, decimals as strings."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def fetch_page(cur: psycopg2.extensions.cursor, name: str, params: dict[str, Any], limit: int) -> dict[str, Any]:
    """Run a named listing newest first by `id`, below `before` when given; return a page and where the next starts.

    The statement takes %(before)s (NULL for the first page) and %(limit)s, and is asked for one row more than
    the page, to tell whether another page follows.
    """
    cur.execute(query(name), {**params, "limit": limit + 1})
    rows = json_rows(cur)
    more = len(rows) > limit
    return {"entries": rows[:limit], "next_before": rows[limit - 1]["id"] if more else None}


def first_line(err: Exception) -> str:
    """Return the first line of an error message, which carries its meaning."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
