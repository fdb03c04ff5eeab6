"""Idle cycles: what a cycle that finds nothing new costs when each queue table holds many rows."""

from __future__ import annotations

import statistics
import time

import psycopg2

import config
import service
from bench.data import TIERS, run
from devkit import ROOT, postgres

TABLES = ("investment_queue", "withdrawal_queue")


def build(server: str, rows: int) -> tuple[str, str]:
    """Create queue-db with `rows` settled entries per queue table and user-portfolio-db; return their names."""
    queue = postgres.create_template(server, "bench_idle_queue", ROOT / "schema" / "queue_db.sql")
    portfolio = postgres.create_template(server, "bench_idle_portfolio", ROOT / "schema" / "user_portfolio_db.sql")
    quri = postgres.with_database(server, queue)
    for table in TABLES:
        run(quri, f"INSERT INTO {table} (account_number, uuid, status, updated_at)"  # noqa: S608
                  " SELECT (1000000000 + n / 10)::text, md5(n::text)::uuid::text, 'COMPLETED',"
                  " now() - (%s - n) * interval '1 millisecond' FROM generate_series(1, %s) AS n",
            (rows, rows))  # fmt: skip
    run(quri, "ANALYZE")
    return queue, portfolio


def idle_cycle_ms(server: str, rows: int, cycles: int = 20) -> tuple[float, float]:
    """Time cycles with nothing new behind watermarks at the end of `rows` rows per queue; return median, max ms."""
    names = build(server, rows)
    quri, puri = (postgres.with_database(server, name) for name in names)
    settings = config.load_settings({**TIERS, "QUEUE_DB_URI": quri, "USER_PORTFOLIO_DB_URI": puri})
    svc = service.build_service(settings)
    try:
        svc.runner.prepare()
        for table, queue in zip(TABLES, ("investment", "withdrawal"), strict=True):
            run(puri, "UPDATE consistency.watermarks SET updated_at = %s, queue_id = %s WHERE queue = %s",
                (*newest(quri, table), queue))  # fmt: skip
        svc.poller.run_once()  # warm the pools and the plans
        times = []
        for _ in range(cycles):
            started = time.perf_counter()
            summary = svc.poller.run_once().to_json()
            times.append((time.perf_counter() - started) * 1000)
            if summary["result"] != "ok" or any(c["read"] for c in summary["counts"].values()):
                raise RuntimeError(f"an idle cycle found work: {summary}")
        return statistics.median(times), max(times)
    finally:
        svc.close()
        for name in names:
            postgres.drop(server, name)


def newest(queue_uri: str, table: str) -> tuple:
    """Return the position of a queue table's newest entry."""
    conn = psycopg2.connect(queue_uri)
    with conn.cursor() as cur:
        cur.execute(f"SELECT updated_at, queue_id FROM {table} ORDER BY updated_at DESC, queue_id DESC LIMIT 1")  # noqa: S608
        position = cur.fetchone()
    conn.close()
    return position
