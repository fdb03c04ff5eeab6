"""A PostgreSQL server for the tests, and fresh databases cloned from templates."""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions

Cursor = psycopg2.extensions.cursor

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_names = itertools.count()


def with_database(uri: str, dbname: str) -> str:
    """Return the server URI aimed at another database."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reachable(uri: str) -> bool:
    """Tell whether a PostgreSQL server answers at this URI."""
    try:
        psycopg2.connect(uri, connect_timeout=3).close()
    except psycopg2.OperationalError:
        return False
    return True


def server_uri() -> tuple[str, object | None]:
    """Find a server: TEST_DATABASE_URL, 127.0.0.1:5432, or an embedded one (returned to keep it alive).

    TEST_DATABASE_URL=embedded forces the embedded server.
    """
    explicit = os.environ.get("TEST_DATABASE_URL")
    if explicit and explicit != "embedded":
        return explicit, None
    if explicit is None and reachable(DEFAULT_URL):
        return DEFAULT_URL, None
    import pgserver  # only needed where no server runs

    server = pgserver.get_server(Path(tempfile.mkdtemp(prefix="cm-test-pg-")), cleanup_mode="delete")
    return server.get_uri(), server


def admin(uri: str, statement: str) -> None:
    """Run CREATE or DROP DATABASE on the server, outside any transaction."""
    conn = psycopg2.connect(uri)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def unique_name(prefix: str) -> str:
    """Return a database name no other test run uses."""
    return f"{prefix}_{os.getpid()}_{next(_names)}"


def create_template(uri: str, prefix: str, ddl: Path, prepare: Callable[[Cursor], object] | None = None) -> str:
    """Create a template database holding a schema file's tables, then whatever `prepare` adds."""
    name = unique_name(prefix)
    admin(uri, f'CREATE DATABASE "{name}"')
    apply_schema(with_database(uri, name), ddl, prepare)
    return name


def apply_schema(uri: str, ddl: Path, prepare: Callable[[Cursor], object] | None = None) -> None:
    """Run a schema file on a database, as psql -f would, then whatever `prepare` adds, in one transaction."""
    db = psycopg2.connect(uri)
    with db.cursor() as cur:
        cur.execute(ddl.read_text())
        if prepare is not None:
            prepare(cur)
    db.commit()
    db.close()


def clone(uri: str, template: str) -> str:
    """Create a fresh database from a template; fast, and isolated from every other test."""
    name = unique_name(template.replace("tpl", "t"))
    # FILE_COPY skips WAL-logging every block: about twice as fast for these small databases.
    admin(uri, f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    return name


def drop(uri: str, name: str) -> None:
    """Drop a database, ending any session still on it."""
    admin(uri, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def with_user(uri: str, user: str) -> str:
    """Return the URI logging in as another role (trust authentication, no password)."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def apply_grants(uri: str, role: str, queue_db: str, portfolio_db: str, read_all_stats: bool = False) -> None:
    """Run schema/grants.sql for a role, as psql would with its three variables set."""
    names = {"service_role": role, "queue_db": queue_db, "portfolio_db": portfolio_db}
    text = (ROOT / "schema" / "grants.sql").read_text()
    if read_all_stats:
        text = text.replace("-- GRANT pg_read_all_stats", "GRANT pg_read_all_stats")
    for section in text.split("\\connect ")[1:]:
        target, _, statements = section.partition("\n")
        for name, value in names.items():
            statements = statements.replace(f':"{name}"', f'"{value}"')
        conn = psycopg2.connect(with_database(uri, names[target.strip()[2:-1]]))
        with conn.cursor() as cur:
            cur.execute(statements)
        conn.commit()
        conn.close()


@contextmanager
def login_role(uri: str, prefix: str) -> Iterator[str]:
    """Create a login role (trust authentication, no password) for the block, then drop it."""
    role = unique_name(prefix)
    admin(uri, f"CREATE ROLE {role} LOGIN")
    try:
        yield role
    finally:
        admin(uri, f"DROP ROLE IF EXISTS {role}")
