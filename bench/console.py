"""The console's pages at size: the overview, the parked entries (first page, a page deep in the list, one account's,
a reason's) and an account's page, over 1,000,000 journal records and 100,000 parked entries, each the median of
repeated requests through the app, signed in as an operator would be.

python -m bench.console runs this part alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import psycopg2

import config
from bench.data import TIERS, build_templates, run
from devkit import postgres
from parked import ParkedPosition

DRAINED = 10_000  # entries the service itself drains first, so that every table holds what a cycle writes
ACCOUNTS = 100_000  # accounts the journal records and the parked entries are spread over
TOKEN = "bench-console-token-0123456789"  # noqa: S105 - the benchmark's own throwaway token
TARGET_MS = 200.0


def console_pages(server: str, journal: int, parked: int, samples: int) -> dict[str, Any]:
    """Fill a drained service's state with `journal` journal records and `parked` parked entries; time each page."""
    from consistency_manager_svc import create_app
    from service import service_of

    names = build_templates(server, DRAINED)
    quri, puri = (postgres.with_database(server, name) for name in names)
    env = {**TIERS, "QUEUE_DB_URI": quri, "USER_PORTFOLIO_DB_URI": puri, "DRIFT_CHECK_INTERVAL": "0",
           "API_TOKEN": TOKEN, "LOG_LEVEL": "WARNING", "LISTEN_NOTIFY": "false"}  # fmt: skip
    app = create_app(config.load_settings(env))
    try:
        service_of(app).runner.prepare()
        service_of(app).poller.run_once()
        fill(puri, journal, parked)
        client = app.test_client()
        if client.post("/console/signin", data={"token": TOKEN}).status_code != 303:
            raise RuntimeError("the benchmark could not sign in to the console")
        forget = service_of(app).cache.forget
        return {"journal": journal, "parked": parked, "pages": timed_pages(client, forget, puri, parked, samples)}
    finally:
        service_of(app).close()
        for name in names:
            postgres.drop(server, name)


def fill(portfolio_uri: str, journal: int, parked: int) -> None:
    """Add journal records (an applied entry's, with its amounts) and parked entries, spread over ACCOUNTS accounts
    and interleaved in time, then analyse the tables as autovacuum would."""
    run(portfolio_uri, "INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status,"
        " tier1_before, tier2_before, tier3_before, tier1_after, tier2_after, tier3_after, tier_version, cycle, at)"
        " SELECT CASE WHEN n %% 2 = 0 THEN 'investment' ELSE 'withdrawal' END, 1000000 + n,"
        " (2000000000 + n %% %s)::text, 'applied', 'COMPLETED', 100, 200, 300, 103, 199, 307, 1, 1 + n / 5000,"
        " now() - interval '1 second' * (%s - n) / 100 FROM generate_series(0, %s - 1) AS n",
        (ACCOUNTS, journal, journal))  # fmt: skip
    run(portfolio_uri, "INSERT INTO consistency.parked_entries (queue, queue_id, uuid, account_number, status,"
        " updated_at, reason, attempts, parked_at, last_attempt_at)"
        " SELECT CASE WHEN n %% 2 = 0 THEN 'investment' ELSE 'withdrawal' END, 5000000 + n, md5('p' || n)::uuid::text,"
        " (2000000000 + n %% %s)::text, 'COMPLETED', now(), CASE WHEN n %% 10 = 0"
        " THEN 'no portfolio for account ' || (2000000000 + n %% %s) ELSE 'no portfolio transaction' END,"
        " 1 + n %% 7, now() - interval '1 second' * (%s - n) / 10, now() FROM generate_series(0, %s - 1) AS n",
        (ACCOUNTS, ACCOUNTS, parked, parked))  # fmt: skip
    conn = psycopg2.connect(portfolio_uri)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE consistency.journal")
        cur.execute("VACUUM ANALYZE consistency.parked_entries")
    conn.close()


def deep_position(portfolio_uri: str, offset: int) -> str:
    """The position (`after`) of the parked entry `offset` places into the list, as a page's next link gives it."""
    conn = psycopg2.connect(portfolio_uri)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT parked_at, queue, queue_id FROM consistency.parked_entries"
                    " ORDER BY parked_at, queue, queue_id OFFSET %s LIMIT 1", (offset,))  # fmt: skip
        row = cur.fetchone()
    conn.close()
    if row is None:
        raise RuntimeError("no parked entry that deep")
    return ParkedPosition(*row).token()


def timed_pages(
    client: Any, forget: Callable[[], None], portfolio_uri: str, parked: int, samples: int
) -> dict[str, tuple[float, float]]:
    """Request each page `samples` times after one warm-up; return each page's median and slowest, in milliseconds.
    Each request reads the stored state afresh (`forget`), as the first after the service's few seconds of keeping
    it do: the slower case, every time."""
    account = "2000012345"
    pages = {
        "overview": "/console/",
        "parked, first page": "/console/parked",
        "parked, half-way down": f"/console/parked?after={deep_position(portfolio_uri, parked // 2)}",
        "parked, one account": f"/console/parked?account={account}",
        "parked, a reason": "/console/parked?reason=no+portfolio+for",
        "an account": f"/console/accounts?account={account}",
    }
    medians = {}
    for name, path in pages.items():
        times = []
        for _ in range(samples + 1):
            forget()
            started = time.perf_counter()
            answer = client.get(path)
            times.append((time.perf_counter() - started) * 1000)
            if answer.status_code != 200:
                raise RuntimeError(f"{path} answered {answer.status_code}")
        medians[name] = (statistics.median(times[1:]), max(times[1:]))
    return medians


def console_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Describe each page's median as a row of the benchmark's table."""
    size = f"{result['journal']:,} journal records, {result['parked']:,} parked entries"
    return [
        (
            f"console: {name}",
            f"median {median:.1f} ms, slowest {slowest:.1f} ms, at {size} (target: median < {TARGET_MS:.0f} ms)",
        )
        for name, (median, slowest) in result["pages"].items()
    ]


def main() -> None:
    """Time the console's pages at size and print their rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--journal", type=int, default=1_000_000, help="journal records (default 1000000)")
    parser.add_argument("--parked", type=int, default=100_000, help="parked entries (default 100000)")
    parser.add_argument("--samples", type=int, default=20, help="requests per page (default 20)")
    args = parser.parse_args()
    server, keep_alive = postgres.server_uri()
    for name, value in console_rows(console_pages(server, args.journal, args.parked, args.samples)):
        print(f"| {name} | {value} |")
    del keep_alive


if __name__ == "__main__":
    main()
