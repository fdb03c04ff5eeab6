"""Creates and migrates the service's own `consistency` schema in user-portfolio-db."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import psycopg2.extensions

from db import one_row
from queries import SQL_DIR, query

log = logging.getLogger(__name__)

MIGRATIONS_DIR = SQL_DIR / "migrations"
# Any constant shared by every process of the service: the advisory lock that serialises migrations.
MIGRATION_LOCK_KEY = 0x434D_4D49_4752  # "CMMIGR"


def available_migrations() -> list[tuple[int, str, Path]]:
    """List the migration files as (version, name, path), in order."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return found


LATEST_VERSION = available_migrations()[-1][0]


def migrate(cur: psycopg2.extensions.cursor) -> list[int]:
    """Apply the missing migrations in one transaction, serialised across processes."""
    cur.execute(query("migration_lock"), {"key": MIGRATION_LOCK_KEY})
    cur.execute(query("schema_exists"))
    if not one_row(cur)[0]:
        # Needs CREATE on the database; schema/grants.sql creates the schema instead, for least privilege.
        cur.execute(query("create_state_schema"))
    cur.execute(query("create_migration_ledger"))
    cur.execute(query("applied_migrations"))
    done = {row[0] for row in cur.fetchall()}
    applied = []
    for version, name, path in available_migrations():
        if version in done:
            continue
        cur.execute(path.read_text())
        cur.execute(query("record_migration"), {"version": version, "name": name})
        applied.append(version)
        log.info("applied migration %04d_%s", version, name)
    return applied


def schema_version(cur: psycopg2.extensions.cursor) -> int | None:
    """Return the newest applied migration, or None when the schema is not there."""
    cur.execute(query("migration_ledger_exists"))
    if not one_row(cur)[0]:
        return None
    cur.execute(query("applied_migrations"))
    versions = [row[0] for row in cur.fetchall()]
    return max(versions, default=None)


def missing_watermark_indexes(cur: psycopg2.extensions.cursor, tables: list[str]) -> list[str]:
    """Return the queue tables that lack the (updated_at, queue_id) index."""
    missing = []
    for table in tables:
        cur.execute(query("queue_has_watermark_index"), {"table": table})
        if not one_row(cur)[0]:
            missing.append(table)
    return missing


def naive_timestamp_columns(cur: psycopg2.extensions.cursor, tables: list[str]) -> tuple[list[str], str]:
    """Return the queue tables whose updated_at has no time zone, and queue-db's TimeZone that reads them."""
    cur.execute(query("queue_timestamp_types"), {"tables": tables})
    rows = cur.fetchall()
    naive = [table for table, kind, _ in rows if kind == "timestamp without time zone"]
    return naive, rows[0][2] if rows else ""
