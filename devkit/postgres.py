"""A PostgreSQL server to work on, and databases on it: created from schema files, cloned from templates, dropped."""

from __future__ import annotations

import glob
import itertools
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions

from devkit import ROOT

Cursor = psycopg2.extensions.cursor

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
EMBEDDED = "embedded"  # the value of TEST_DATABASE_URL or DEMO_PG_URI that forces an embedded server
_names = itertools.count()


def with_database(uri: str, dbname: str) -> str:
    """Return the server URI aimed at another database."""
    return urlunsplit(urlsplit(uri)._replace(path=f"/{dbname}"))


def reachable(uri: str) -> bool:
    """Tell whether a PostgreSQL server answers at this URI."""
    try:
        psycopg2.connect(uri, connect_timeout=3).close()
    except psycopg2.OperationalError:
        return False
    return True


def find_server(chosen: str | None, pgdata: Path | None = None) -> tuple[str, object | None]:
    """Return the URI of `chosen`, else of 127.0.0.1:5432 if it answers, else of an embedded server.

    `chosen` set to "embedded" forces the embedded server. The second value keeps an embedded server alive
    (None otherwise); its files go to `pgdata`, kept between runs, or to a temporary folder deleted after.
    """
    if chosen and chosen != EMBEDDED:
        return chosen, None
    if not chosen and reachable(LOCAL_SERVER):
        return LOCAL_SERVER, None
    return embedded_server(pgdata)


def embedded_server(pgdata: Path | None) -> tuple[str, object]:
    """Start PostgreSQL from the binaries the pgserver package ships; return its URI and the server."""
    import pgserver  # only needed where no server runs

    if pgdata is None:
        folder, cleanup = Path(tempfile.mkdtemp(prefix="cm-pg-")), "delete"
    else:
        pgdata.mkdir(parents=True, exist_ok=True)
        folder, cleanup = pgdata, "stop"
    print(f"starting an embedded PostgreSQL in {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}")
    server = pgserver.get_server(folder, cleanup_mode=cleanup)
    return server.get_uri(), server


def server_uri() -> tuple[str, object | None]:
    """Find the server of the tests and the benchmark: TEST_DATABASE_URL, 127.0.0.1:5432, or an embedded one."""
    return find_server(os.environ.get("TEST_DATABASE_URL"))


def admin(uri: str, statement: str) -> None:
    """Run CREATE or DROP DATABASE (or ROLE) on the server, outside any transaction."""
    conn = psycopg2.connect(uri)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def unique_name(prefix: str) -> str:
    """Return a database name no other run uses."""
    return f"{prefix}_{os.getpid()}_{next(_names)}"


def create_database(uri: str, name: str, ddl: Path, prepare: Callable[[Cursor], object] | None = None) -> str:
    """Create a database holding a schema file's tables, then whatever `prepare` adds; return its URI."""
    admin(uri, f'CREATE DATABASE "{name}"')
    database = with_database(uri, name)
    apply_schema(database, ddl, prepare)
    return database


def create_template(uri: str, prefix: str, ddl: Path, prepare: Callable[[Cursor], object] | None = None) -> str:
    """Create a template database holding a schema file's tables, then whatever `prepare` adds; return its name."""
    name = unique_name(prefix)
    create_database(uri, name, ddl, prepare)
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
    """Create a fresh database from a template; fast, and isolated from every other user of the server."""
    name = unique_name(template.replace("tpl", "t"))
    # FILE_COPY skips WAL-logging every block: about twice as fast for these small databases.
    admin(uri, f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
    return name


def drop(uri: str, name: str) -> None:
    """Drop a database, ending any session still on it."""
    admin(uri, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def server_major(uri: str) -> int:
    """The major version of the PostgreSQL server at a URI."""
    conn = psycopg2.connect(uri)
    try:
        return conn.server_version // 10000
    finally:
        conn.close()


def tool_major(path: Path) -> int:
    """The major version of a PostgreSQL client program."""
    shown = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True).stdout  # noqa: S603
    found = re.search(r"\(PostgreSQL\) (\d+)", shown)
    if found is None:
        raise RuntimeError(f"{path} --version printed {shown!r}")
    return int(found.group(1))


def pg_tool(uri: str, name: str) -> Path:
    """Find pg_dump or pg_restore of the server's own major version: Debian's, or those the pgserver package ships."""
    candidates = [Path(d) / name for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    try:
        import pgserver

        candidates.append(Path(pgserver.__file__).parent / "pginstall" / "bin" / name)
    except ImportError:
        pass
    major = server_major(uri)
    for path in candidates:
        if path.exists() and tool_major(path) == major:
            return path
    raise AssertionError(f"no {name} of PostgreSQL {major} among {[str(p) for p in candidates]}")
