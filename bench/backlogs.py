"""The traffic shapes' data: backlogs shaped as real traffic is, on an empty ledger or behind applied history.

Every row is drawn from its entry number n by formulas in SQL (md5 where chance is wanted), so queue-db and
user-portfolio-db get the same entries, and every run the same data.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg2

import config
import service
from bench.approaches import RECORD
from bench.data import TIERS, run
from bench.idle import newest
from devkit import ROOT, postgres
from domain import QUEUES

SHAPES = ("clustered", "interleaved", "skewed", "mixed")
PARK_EVERY = 10_000  # mixed: entries 7 and 13 modulo this are parked (no portfolio; another account's transaction)
CORRECT_EVERY = 50_000  # mixed on history: history rows whose queue_id is 1 modulo this change status


def uniform(salt: str) -> str:
    """SQL for a number in [0, 1) drawn from entry n by md5."""
    return f"(('x' || substr(md5('{salt}' || n), 1, 7))::bit(28)::int / 268435456.0)"


HOT = "greatest(1, %(a)s / 100)"  # the busiest 1% of the accounts, in the skewed shape
# The account index of entry n among %(a)s accounts.
ACCOUNT = {
    "history": "n / 10",
    "clustered": "n / 10",
    "interleaved": "n %% %(a)s",
    # Half the entries go to the busiest 1% of accounts, evenly (500 each), the other half to the rest. Not a Zipf
    # head: at +3% per investment (TIERS) an account with more than about 780 of them overflows NUMERIC(15,2).
    "skewed": f"least(%(a)s - 1, CASE WHEN {uniform('s')} < 0.5 THEN floor({uniform('t')} * {HOT})"
    f" ELSE {HOT} + floor({uniform('t')} * (%(a)s - {HOT})) END)::int",
    "mixed": "n %% %(a)s",
}
# 0 for an investment, 1 for a withdrawal: each account of the interleaved shapes gets both.
KIND = {"interleaved": "(n / %(a)s) %% 2", "mixed": "(n / %(a)s) %% 2"}
SPECIAL = "n %% %(every)s IN (7, 13)"
MIXED_STATUS = (
    f"CASE WHEN {SPECIAL} THEN 'COMPLETED'"
    f" ELSE (ARRAY['COMPLETED', 'FAILED', 'CANCELLED'])[width_bucket({uniform('m')}, ARRAY[0.8, 0.9]) + 1] END"
)
ENTRIES = """
SELECT n, md5(%(salt)s || n)::uuid AS txn, stamp, kind, status, lost,
       CASE WHEN lost THEN (2000000000 + n)::text ELSE (1000000000 + a)::text END AS account,
       (1000000000 + CASE WHEN moved THEN (a + 1) %% %(a)s ELSE a END)::text AS owner
  FROM (SELECT n, {account} AS a, {kind} AS kind, {status} AS status, {stamp} AS stamp, {lost} AS lost,
               {moved} AS moved
          FROM generate_series(0, %(n)s - 1) AS n) AS e
"""
PORTFOLIOS = (
    "INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,"
    " total_allocation, tier1_value, tier2_value, tier3_value, total_value)"
    " SELECT (1000000000 + a)::text, 100, 200, 300, 600, 1000, 2000, 3000, 6000"
    " FROM generate_series(0, %(a)s - 1) AS a ON CONFLICT DO NOTHING"
)
TRANSACTIONS = (
    "INSERT INTO portfolio_transactions (id, accountid, transaction_type, total_amount)"
    " SELECT txn, owner, CASE kind WHEN 0 THEN 'INVEST' ELSE 'WITHDRAWAL' END, 100 FROM ({entries}) AS e"
    " WHERE NOT lost"
)
QUEUE_ROWS = (
    "INSERT INTO {table} (account_number, tier_1, tier_2, tier_3, uuid, status, updated_at, processed_at)"
    " SELECT account, 10, 20, 30, txn::text, status, stamp, stamp FROM ({entries}) AS e"
    " WHERE kind = %(kind)s ORDER BY n"
)
# The queue's trigger would stamp each change now(): replica mode skips it, so that corrections land in the backlog.
CORRECT = (
    "SET LOCAL session_replication_role = replica;"
    " UPDATE {table} SET status = 'FAILED', processed_at = %(base)s::timestamptz + (queue_id %% %(n)s) * interval"
    " '1 millisecond', updated_at = %(base)s::timestamptz + (queue_id %% %(n)s) * interval '1 millisecond'"
    " WHERE queue_id %% %(every)s = 1"
)


def entries_sql(shape: str) -> str:
    """Return the SELECT of a shape's entries: number, transaction, stamp, kind, status, account and owner."""
    mixed = shape == "mixed"
    return ENTRIES.format(
        account=ACCOUNT[shape],
        kind=KIND.get(shape, "n %% 2"),
        status=MIXED_STATUS if mixed else "'COMPLETED'",
        stamp="%(base)s::timestamptz" if shape == "clustered" else "%(base)s::timestamptz + n * interval '1 ms'",
        lost="n %% %(every)s = 7" if mixed else "FALSE",
        moved="n %% %(every)s = 13" if mixed else "FALSE",
    )


def shape_params(count: int, base: datetime, salt: str = "e") -> dict[str, object]:
    """The parameters of entries_sql: how many entries, among how many accounts, from when, under which uuids."""
    return {"n": count, "a": max(1, count // 10), "base": base, "salt": salt, "every": PARK_EVERY}


def add_entries(queue_uri: str, portfolio_uri: str, shape: str, count: int, base: datetime, salt: str = "e") -> None:
    """Add `count` entries of a shape from `base` on: their accounts' portfolios, transactions and queue rows."""
    params = shape_params(count, base, salt)
    entries = entries_sql(shape)
    run(portfolio_uri, PORTFOLIOS, params)
    run(portfolio_uri, TRANSACTIONS.format(entries=entries), params)
    for kind, queue in enumerate(QUEUES):
        run(queue_uri, QUEUE_ROWS.format(table=queue.table, entries=entries), {**params, "kind": kind})


SHARE = (
    "SELECT sum(c)::float8 / %(n)s FROM (SELECT count(*) AS c FROM ({entries}) AS e GROUP BY account"
    " ORDER BY c DESC LIMIT greatest(1, %(a)s / 100)) AS busiest"
)


def busiest_share(server: str, shape: str, count: int) -> float:
    """Return the share of a shape's entries that its busiest 1% of accounts carry."""
    conn = psycopg2.connect(server)
    with conn.cursor() as cur:
        cur.execute(SHARE.format(entries=entries_sql(shape)), shape_params(count, datetime.now(UTC)))
        share = cur.fetchone()[0]
    conn.close()
    return share


def parked_of(shape: str, count: int) -> int:
    """Return how many of a shape's entries the service parks: the mixed shape's few."""
    return len(range(7, count, PARK_EVERY)) + len(range(13, count, PARK_EVERY)) if shape == "mixed" else 0


def correct_history(queue_uri: str, base: datetime, count: int) -> int:
    """Turn a few applied history entries FAILED, stamped among the backlog's; return how many."""
    changed = 0
    conn = psycopg2.connect(queue_uri)
    with conn, conn.cursor() as cur:
        for queue in QUEUES:
            cur.execute(CORRECT.format(table=queue.table), {"base": base, "n": count, "every": CORRECT_EVERY})
            changed += cur.rowcount
    conn.close()
    return changed


def vacuum(*uris: str) -> None:
    """VACUUM ANALYZE databases, as autovacuum would have by the time a backlog is drained."""
    for uri in uris:
        conn = psycopg2.connect(uri)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE")
        conn.close()


@dataclass(frozen=True)
class Ledger:
    """What a backlog lands on: an empty ledger, or templates holding history the service applied."""

    history: int
    templates: tuple[str, str] | None = None
    ends: dict[str, tuple[datetime, int]] | None = None  # per queue, the history's last position
    journal: int = 0  # journal records of the history

    def describe(self) -> str:
        """Name the ledger in a row of the table."""
        return f"{self.history:,} history" if self.history else "empty ledger"


def history_ledger(server: str, history: int) -> Ledger:
    """Build templates holding `history` entries the service drained itself, behind the watermarks."""
    names = (
        postgres.create_template(server, "bench_tpl_hq", ROOT / "schema" / "queue_db.sql"),
        postgres.create_template(server, "bench_tpl_hp", ROOT / "schema" / "user_portfolio_db.sql"),
    )
    try:
        return fill_history(server, names, history)
    except BaseException:
        for name in names:
            postgres.drop(server, name)
        raise


def fill_history(server: str, names: tuple[str, str], history: int) -> Ledger:
    """Add `history` entries to fresh templates and have the service apply them; return the ledger they make."""
    quri, puri = (postgres.with_database(server, name) for name in names)
    add_entries(quri, puri, "history", history, datetime.now(UTC) - timedelta(days=2), salt="h")
    vacuum(quri, puri)
    seconds = drain_in_process(quri, puri, history)
    print(f"history: {history:,} entries applied by the service in {seconds:.0f} s", file=sys.stderr, flush=True)
    with psycopg2.connect(puri) as conn, conn.cursor() as cur:
        # A service started within POLLING_INTERVAL of a stored cycle skips its start-up cycle: this one is old.
        cur.execute("UPDATE consistency.cycle_lease SET cycle_started_at = '-infinity'")
        cur.execute(RECORD)  # the lean bound's record of the same history
        cur.execute("INSERT INTO bench_applied SELECT queue, queue_id FROM consistency.applied_entries")
        cur.execute("SELECT count(*) FROM consistency.journal")
        journal = cur.fetchone()[0]
    conn.close()
    vacuum(quri, puri)
    return Ledger(history, names, history_ends(quri), journal)


def drain_in_process(queue_uri: str, portfolio_uri: str, entries: int, parked: int = 0) -> float:
    """Have the service, in this process, apply a backlog in one cycle; fail unless it read and parked as expected."""
    env = {**TIERS, "QUEUE_DB_URI": queue_uri, "USER_PORTFOLIO_DB_URI": portfolio_uri, "DRIFT_CHECK_INTERVAL": "0"}
    svc = service.build_service(config.load_settings({**env, "LOG_LEVEL": "WARNING"}))
    try:
        svc.runner.prepare()
        started = time.perf_counter()
        drained = svc.poller.run_once().to_json()
    finally:
        svc.close()
    counts = drained["counts"].values() if drained["result"] == "ok" else []
    if sum(c["read"] for c in counts) != entries or sum(c["parked"] for c in counts) != parked:
        raise RuntimeError(f"the drain did not read {entries} entries and park {parked}: {drained}")
    return time.perf_counter() - started


def history_ends(queue_uri: str) -> dict[str, tuple[datetime, int]]:
    """Return each queue's last position: where a backlog behind the history starts."""
    return {queue.name: newest(queue_uri, queue.table) for queue in QUEUES}
