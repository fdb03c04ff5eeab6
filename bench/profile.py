"""Where the service's time goes in a drain: its SQL functions' times, as PostgreSQL's track_functions counts them.

Timing every function call costs time itself, so a profiled drain is an extra one, never one whose rate is kept.
"""

from __future__ import annotations

import psycopg2

from devkit import postgres

PROFILED = "service, profiled"
# A function's name, calls, and milliseconds in all (callees included) and of its own.
Function = tuple[str, int, float, float]
TOP = (
    "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT %(limit)s"
)


def track_functions(server: str, dbname: str) -> None:
    """Have PostgreSQL time every function call in a database, for the sessions that connect from now on."""
    postgres.admin(server, f"ALTER DATABASE \"{dbname}\" SET track_functions = 'all'")


def top_functions(uri: str, limit: int = 8) -> tuple[Function, ...]:
    """Return the functions that took the most time of their own in a database, once its sessions have ended."""
    conn = psycopg2.connect(uri)
    with conn.cursor() as cur:
        cur.execute(TOP, {"limit": limit})
        rows = tuple((name, calls, float(total), float(own)) for name, calls, total, own in cur.fetchall())
    conn.close()
    return rows


def profile_lines(functions: tuple[Function, ...]) -> list[str]:
    """Return a Markdown table of functions' times."""
    lines = ["| function | calls | total ms | own ms |", "|---|---:|---:|---:|"]
    return lines + [f"| {name} | {calls:,} | {total:,.0f} | {own:,.0f} |" for name, calls, total, own in functions]
