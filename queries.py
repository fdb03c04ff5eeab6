"""Named SQL statements, loaded from sql/queries.sql."""

from __future__ import annotations

import re
from pathlib import Path

from psycopg2 import sql

SQL_DIR = Path(__file__).resolve().parent / "sql"
_HEADER = re.compile(r"^-- ([a-z_]+): (.+)$", re.MULTILINE)


def load_queries(text: str) -> dict[str, str]:
    """Split a file of `-- name: description` blocks into statements by name."""
    headers = list(_HEADER.finditer(text))
    queries = {}
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        end = following.start() if following else len(text)
        queries[header.group(1)] = _without_trailing_comments(text[header.end() : end])
    return queries


def _without_trailing_comments(statement: str) -> str:
    """Drop the comment lines after a statement, such as the heading of the next section."""
    lines = statement.strip().splitlines()
    while lines and (lines[-1].startswith("--") or not lines[-1].strip()):
        lines.pop()
    return "\n".join(lines)


QUERIES = load_queries((SQL_DIR / "queries.sql").read_text())


def query(name: str) -> str:
    """Return the statement with this name."""
    return QUERIES[name]


def table_query(name: str, table: str) -> sql.Composed:
    """Return the statement with this name, aimed at one of the fixed queue tables."""
    return sql.SQL(QUERIES[name]).format(table=sql.Identifier(table))
