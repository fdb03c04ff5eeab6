"""Plans that hold however the data grows: an idle cycle's index range scans on the queues and its fourteen
statements, and apply steps that read the batch once and user-portfolio-db by its keys, whatever the ledger holds."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

import apply
from apply import CAREFUL_STEPS, CLEAN_STEPS, load_entries, step_params
from domain import INVESTMENT, Entry
from queries import query, table_query
from tests.world import STAMP, World


def plan_nodes(plan: dict) -> list[dict]:
    """Flatten an EXPLAIN (FORMAT JSON) plan into its nodes."""
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


@pytest.mark.parametrize("table", ["investment_queue", "withdrawal_queue"])
def test_reading_after_the_watermark_is_an_index_range_scan(world: World, table: str) -> None:
    world.q(
        f"INSERT INTO {table} (account_number, uuid, status, updated_at)"
        " SELECT '1000000001', md5(n::text), 'COMPLETED', now() - (200000 - n) * interval '1 second'"
        " FROM generate_series(1, 200000) AS n"
    )
    world.q(f"ANALYZE {table}")
    watermark = world.q(f"SELECT updated_at, queue_id FROM {table} ORDER BY updated_at DESC, queue_id DESC LIMIT 1")[0]
    with world.queue.cursor() as cur:
        copy = table_query("queue_copy_batch", table).as_string(cur)
        statement = re.fullmatch(r"COPY \((.*)\) TO STDOUT;", copy, re.DOTALL).group(1)
        cur.execute(
            "EXPLAIN (FORMAT JSON) " + statement, {"after_ts": watermark[0], "after_id": watermark[1], "limit": 5000}
        )
        raw = cur.fetchone()[0]
    nodes = plan_nodes((raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"])
    scans = [n for n in nodes if "Scan" in n["Node Type"]]
    assert [n["Node Type"] for n in scans] == ["Index Scan"]
    assert scans[0]["Index Name"] == f"{table}_updated_at_queue_id"
    assert "Index Cond" in scans[0]  # a range on (updated_at, queue_id), not a full index walk


def test_an_idle_cycle_makes_fourteen_statements_and_five_commits(make_service, mocker) -> None:
    import db

    calls: Counter[str] = Counter()

    class CountingCursor(psycopg2.extensions.cursor):
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            calls["statements"] += 1
            return super().execute(*args, **kwargs)

        def copy_expert(self, *args: Any, **kwargs: Any) -> Any:
            calls["statements"] += 1
            return super().copy_expert(*args, **kwargs)

    class CountingConnection(psycopg2.extensions.connection):
        def cursor(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("cursor_factory", CountingCursor)
            return super().cursor(*args, **kwargs)

        def commit(self) -> None:
            calls["commits"] += 1
            super().commit()

    options = db.connect_options
    mocker.patch.object(
        db, "connect_options", lambda *a, **k: {**options(*a, **k), "connection_factory": CountingConnection}
    )
    svc = make_service()
    assert svc.poller.run_once().to_json()["result"] == "ok"  # the first cycle also migrates and seeds
    calls.clear()

    summary = svc.poller.run_once().to_json()

    assert summary["result"] == "ok" and all(c["read"] == 0 for c in summary["counts"].values())
    # Over both databases: the lease, the tier values with the watermarks and the pause, the horizon, a COPY
    # per queue, the summary under the lease's fence, the lease given back, and the state kept for /status.
    assert (calls["statements"], calls["commits"]) == (14, 5)


# The apply steps' plans. Each statement below runs inside a versioned PL/pgSQL function, so it is EXPLAINed as that
# function holds it: its text read from pg_proc, its arguments as parameters of a prepared statement, under the
# function's own SET clauses, as a custom plan and as the generic plan PL/pgSQL may keep after five calls, with the
# batch table's statistics and without them. That works on every server: auto_explain, which would show the plans
# from inside the functions, is not in the embedded one.

BATCH = 5_000  # the default BATCH_SIZE
FACTORS = (Fraction(103, 100), Fraction(199, 200), Fraction(41, 40))
ACCOUNTS = 2_000  # a batch's accounts: two or three entries each, interleaved
HISTORY = 100_000  # entries of a long ledger
BATCH_SETS = {"cm_batch", "cm_taken_portfolios", "cm_taken_transactions"}
CONDITIONS = ("Index Cond", "TID Cond", "Recheck Cond", "Filter", "Join Filter", "Hash Cond")
KEYED = {"Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Tid Scan"}
# Per step, the statements whose plans matter: the function that holds each (the step's own, or the one it calls
# by that prefix) and how the statement opens.
PINNED = {
    "claim_batch": [("record_batch", "SELECT array_agg(a.queue_id)")],
    "check_batch": [
        ("", "INSERT INTO pg_temp.cm_taken_portfolios"),
        ("", "INSERT INTO pg_temp.cm_taken_transactions"),
        ("", "SELECT array_agg(me.queue_id)"),
    ],
    "check_clean_batch": [("", "INSERT INTO pg_temp.cm_taken_portfolios")],
    "compound_batch": [("", "WITH eligible AS")],
    "settle_batch": [
        ("", "DELETE FROM consistency.applied_entries a"),
        ("", "WITH ended AS ("),
        ("", "UPDATE portfolio_transactions"),
    ],
    "settle_clean_batch": [("", "UPDATE portfolio_transactions")],
}
# The tables each pinned statement must read only by their keys, however many rows they hold.
BY_KEY = {"user_portfolios", "portfolio_transactions", "applied_entries"}


@dataclass(frozen=True)
class Function:
    """A function of the state schema as pg_proc holds it."""

    source: str
    arguments: tuple[tuple[str, str], ...]  # each argument's name and type, in order
    settings: tuple[str, ...]  # its SET clauses, as name=value


def function(cur: psycopg2.extensions.cursor, name: str) -> Function:
    """Read a function of the consistency schema by name."""
    cur.execute(
        "SELECT p.prosrc, p.proargnames[1:p.pronargs],"
        " ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, i) ORDER BY i),"
        " coalesce(p.proconfig, '{}') FROM pg_proc p WHERE p.oid = ('consistency.' || %s)::regproc",
        (name,),
    )
    source, names, types, settings = cur.fetchone()
    return Function(source, tuple(zip(names, types, strict=True)), tuple(settings))


def versioned(text: str, prefix: str) -> str:
    """The versioned function a text calls by a prefix, e.g. settle_batch_v4 for settle_batch."""
    return re.search(rf"consistency\.({prefix}_v\d+)\(", text).group(1)


def statement(source: str, opening: str) -> str:
    """The statement of a function's source that opens with `opening`, up to its semicolon, less any INTO target."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(opening))
    end = next(i for i in range(start, len(lines)) if not lines[i].strip().startswith("--") and lines[i].endswith(";"))
    text = "\n".join(lines[start : end + 1]).rstrip(";")
    if opening.startswith("SELECT"):  # PL/pgSQL's INTO names variables, not a table
        text = re.sub(r"\s+INTO\s+\w+(?:\s*,\s*\w+)*(?=\s+FROM\b)", "", text, count=1)
    return text


def plans_of(cur: psycopg2.extensions.cursor, held: Function, text: str, params: dict[str, object]) -> list[dict]:
    """EXPLAIN a statement of a function, as a custom and as a generic plan, under the function's SET clauses."""
    names = [name for name, _ in held.arguments if re.search(rf"\b{name}\b", text)]
    types = dict(held.arguments)
    for n, name in enumerate(names, 1):
        text = re.sub(rf"\b{name}\b", f"${n}", text)
    placeholders = [f"%({name.removeprefix('p_')})s" for name in names]
    types_of = f" ({', '.join(types[name] for name in names)})" if names else ""
    values = f" ({', '.join(placeholders)})" if names else ""
    found = []
    cur.execute("SAVEPOINT plans")
    for setting in held.settings:
        cur.execute("SELECT set_config(%s, %s, TRUE)", tuple(setting.split("=", 1)))
    cur.execute(f"PREPARE pinned{types_of} AS {text}")
    for statistics in ("gathered", "lost"):
        if statistics == "lost":
            forget_statistics(cur)
        for mode in ("force_custom_plan", "force_generic_plan"):
            cur.execute("SELECT set_config('plan_cache_mode', %s, TRUE)", (mode,))
            cur.execute(f"EXPLAIN (FORMAT JSON) EXECUTE pinned{values}", params)
            raw = cur.fetchone()[0]
            found.append((raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"])
    cur.execute("DEALLOCATE pinned")
    cur.execute("ROLLBACK TO SAVEPOINT plans")
    return found


def forget_statistics(cur: psycopg2.extensions.cursor) -> None:
    """Take the batch table's statistics away, as a refused clean try took them before claim_batch_v6 (superuser)."""
    cur.execute("DELETE FROM pg_statistic WHERE starelid = 'pg_temp.cm_batch'::regclass")


def inner_nodes(plan: dict) -> list[dict]:
    """The nodes a plan runs again for each row of another: the inner side of each nested loop, less its InitPlans."""
    found = []
    for node in plan_nodes(plan):
        if node["Node Type"] == "Nested Loop":
            inner = next(child for child in node["Plans"] if child["Parent Relationship"] == "Inner")
            found.extend(n for n in once_each(inner))
    return found


def once_each(plan: dict) -> list[dict]:
    """A plan's nodes less those of its InitPlans, which run once however often the plan does."""
    nodes = [plan]
    for child in plan.get("Plans", []):
        if child["Parent Relationship"] != "InitPlan":
            nodes.extend(once_each(child))
    return nodes


def rereads(plan: dict) -> list[str]:
    """Describe what a plan reads again per row of another: a batch table, a CTE or a materialised set, or an array
    of the batch's keys (sorted again each time). Each makes the statement's cost grow with the square of the batch."""
    found = []
    for node in inner_nodes(plan):
        what = f"{node['Node Type']} {node.get('Relation Name', node.get('CTE Name', ''))}".strip()
        if node["Node Type"] in ("CTE Scan", "Materialize") or node.get("Relation Name") in BATCH_SETS:
            found.append(f"nested loop over {what}")
        found += [f"nested loop over {what} by {node[k]}" for k in CONDITIONS if "ANY ($" in node.get(k, "")]
    return found


def searches(plan: dict) -> list[str]:
    """Describe every scan of a table that filters each row by searching an array of the batch's keys."""
    return [
        f"{n['Node Type']} {n['Relation Name']} filtered by {n['Filter']}"
        for n in plan_nodes(plan)
        if "Relation Name" in n and "ANY ($" in n.get("Filter", "")
    ]


def unkeyed(plan: dict, tables: set[str]) -> list[str]:
    """Describe every read of these tables that is not by their keys (an index, or where their rows lie)."""
    return [
        f"{n['Node Type']} {n['Relation Name']}"
        for n in plan_nodes(plan)
        if n.get("Relation Name") in tables and n["Node Type"] not in KEYED and "Scan" in n["Node Type"]
    ]


def history(world: World, entries: int, analysed: bool) -> None:
    """Give the ledger `entries` applied entries, their portfolios and transactions, analysed or not (then kept so)."""
    world.p(
        "INSERT INTO user_portfolios (accountid) SELECT (1100000000 + a)::text FROM generate_series(0, %s - 1) AS a",
        (entries // 10,),
    )
    world.p(
        "INSERT INTO portfolio_transactions (id, accountid, transaction_type, status)"
        " SELECT md5('h' || n)::uuid, (1100000000 + n / 10)::text, 'INVEST', 'PROCESSED'"
        " FROM generate_series(0, %s - 1) AS n",
        (entries,),
    )
    world.p(
        "INSERT INTO consistency.applied_entries (queue, queue_id, txn_id, status)"
        " SELECT 'investment', n, md5('h' || n)::uuid, 'COMPLETED' FROM generate_series(0, %s - 1) AS n",
        (entries,),
    )
    for table in ("user_portfolios", "portfolio_transactions", "consistency.applied_entries"):
        world.p(f"ANALYZE {table}" if analysed else f"ALTER TABLE {table} SET (autovacuum_enabled = off)")


def batch(world: World, careful: bool) -> list[Entry]:
    """A batch of investments as traffic brings them: accounts interleaved, 80% COMPLETED, 10% FAILED, 10% CANCELLED.

    A careful batch also holds entries whose account has no portfolio and entries whose transaction is another
    account's, as the benchmark's mixed shape does.
    """
    params = {"accounts": ACCOUNTS, "entries": BATCH, "careful": careful}
    world.p(
        "INSERT INTO user_portfolios (accountid)"
        " SELECT (1000000000 + a)::text FROM generate_series(0, %(accounts)s - 1) AS a",
        params,
    )
    world.p(
        "INSERT INTO portfolio_transactions (id, accountid, transaction_type)"
        " SELECT md5('b' || n)::uuid, (1000000000 + (n + (%(careful)s AND n %% 1000 = 13)::int) %% %(accounts)s)::text,"
        " 'INVEST' FROM generate_series(0, %(entries)s - 1) AS n",
        params,
    )
    rows = world.p(
        "SELECT 1000000 + n, CASE WHEN %(careful)s AND n %% 1000 = 7 THEN '2000000000'"
        " ELSE (1000000000 + n %% %(accounts)s)::text END, md5('b' || n)::uuid::text,"
        " CASE WHEN %(careful)s AND n %% 1000 IN (7, 13) THEN 'COMPLETED' WHEN n %% 10 = 8 THEN 'FAILED'"
        " WHEN n %% 10 = 9 THEN 'CANCELLED' ELSE 'COMPLETED' END, '2026-12-01'::timestamptz + n * interval '1 ms'"
        " FROM generate_series(0, %(entries)s - 1) AS n ORDER BY n",
        params,
    )
    return [Entry(*row) for row in rows]


def pinned_plans(cur: psycopg2.extensions.cursor, step: str, params: dict[str, object]) -> dict[str, list[dict]]:
    """The plans of a step's pinned statements, by function and opening."""
    found = {}
    for prefix, opening in PINNED.get(step, []):
        name = versioned(query(step), step)
        if prefix:
            name = versioned(function(cur, name).source, prefix)
        held = function(cur, name)
        found[f"{name}: {opening}"] = plans_of(cur, held, statement(held.source, opening), params)
    return found


def described(cur: psycopg2.extensions.cursor) -> bool:
    """Tell whether the batch table has statistics the planner can use."""
    cur.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = pg_my_temp_schema()::regnamespace::text"
        " AND tablename = 'cm_batch')"
    )
    return cur.fetchone()[0]


# The ledger a batch lands on: empty and never analysed (the first drain), or long, analysed by autovacuum or not yet.
LEDGERS = {"empty": None, "long, analysed": True, "long, never analysed": False}


@pytest.mark.parametrize("way", ["clean", "careful"])
@pytest.mark.parametrize("ledger", list(LEDGERS))
def test_each_step_reads_the_batch_once_and_the_ledger_by_its_keys(world: World, ledger: str, way: str) -> None:
    if LEDGERS[ledger] is not None:
        history(world, HISTORY, LEDGERS[ledger])
    entries = batch(world, careful=way == "careful")
    conn = psycopg2.connect(world.portfolio_uri)
    try:
        with conn.cursor() as cur:
            params = step_params(INVESTMENT, FACTORS, STAMP, False)
            load_entries(cur, entries)
            if way == "careful":
                # Refused, as a batch with an entry to park is: the statistics its claim gathered go with it.
                assert apply._try_clean(cur, params) is None
            claim, *others = CLEAN_STEPS if way == "clean" else CAREFUL_STEPS
            cur.execute(query(claim), params)
            kept = described(cur)
            plans = pinned_plans(cur, claim, params)
            for step in others:
                cur.execute(query(step), params)
                plans |= pinned_plans(cur, step, params)
    finally:
        conn.rollback()
        conn.close()

    by_key = BY_KEY if LEDGERS[ledger] is not None else BY_KEY - {"applied_entries"}
    problems = {
        name: found
        for name, each in plans.items()
        if (found := sorted({p for plan in each for p in rereads(plan) + searches(plan) + unkeyed(plan, by_key)}))
    }
    assert len(plans) == (4 if way == "clean" else 8)
    assert (kept, problems) == (True, {})


def test_the_sweep_probes_the_ledger_by_its_index_while_its_statistics_are_stale(world: World) -> None:
    """After a big drain the ledger is far larger than its statistics say until autovacuum analyses it: the sweep's
    filter must still probe it entry by entry, not hash all of it for every page."""
    world.p("ALTER TABLE consistency.applied_entries SET (autovacuum_enabled = off)")
    world.p("ANALYZE consistency.applied_entries")  # empty, as before the drain
    world.p(
        "INSERT INTO consistency.applied_entries (queue, queue_id, uuid, status, txn_id)"
        " SELECT 'investment', n, md5(n::text)::uuid::text, 'COMPLETED', md5(n::text)::uuid"
        " FROM generate_series(1, 200000) AS n"
    )
    ids, uuids = world.p(
        "SELECT array_agg(n), array_agg(md5(n::text)::uuid::text) FROM generate_series(100000, 104999) n"
    )[0]
    params = {"queue": "investment", "queue_ids": ids, "uuids": uuids}
    with world.portfolio, world.portfolio.cursor() as cur:
        cur.execute(query("probe_by_index"))
        cur.execute("EXPLAIN (FORMAT JSON) " + query("filter_unapplied"), params)
        nodes = plan_nodes(cur.fetchone()[0][0]["Plan"])
    ledger = [node for node in nodes if node.get("Relation Name") == "applied_entries"]
    assert [node["Node Type"] for node in ledger] == ["Index Scan"]
    assert not {"Hash Join", "Merge Join"} & {node["Node Type"] for node in nodes}
