"""An idle cycle: index range scans on the queues however large they grow, and fourteen statements in all."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from queries import table_query
from tests.world import World


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
