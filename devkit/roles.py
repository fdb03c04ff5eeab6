"""Login roles, and the shipped grants given to one: the least-privilege role of the tests and the benchmark."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg2

from devkit import ROOT
from devkit.postgres import admin, unique_name, with_database


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
