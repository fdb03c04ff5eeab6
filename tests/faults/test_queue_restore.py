"""queue-db restored from a backup under writers, as the runbook "queue-db restored from a backup" goes: the rows
settled after the dump are lost from queue-db though they moved money, and the requests queued after the restore
get their queue_ids back. Each such row is a new entry, applied once; checked against the independent model."""

from __future__ import annotations

import subprocess
from pathlib import Path

from devkit.net import wait_until
from devkit.postgres import pg_tool
from tests.faults.conftest import Stage, record
from tests.faults.harness import (
    ROW_COLUMNS,
    Replica,
    Writers,
    check_model,
    final_drift_check,
    open_portfolios,
    wait_caught_up,
)
from tests.world import TABLES, World

ACCOUNTS = [f"44000{n:05d}" for n in range(40)]
SETTLED = ("COMPLETED", "FAILED", "CANCELLED")


def rows(world: World) -> dict[tuple[str, int], tuple]:
    """Every queue row, by (queue, queue_id), in the shape the model reads."""
    return {
        (queue, row[0]): row for queue, table in TABLES.items() for row in world.q(f"SELECT {ROW_COLUMNS} FROM {table}")
    }


def write(world: World, settled: int) -> None:
    """Let writers queue and settle requests until `settled` more have settled, then stop them."""
    start = len([r for r in rows(world).values() if r[3] in SETTLED])
    writers = Writers(world, ACCOUNTS).start()
    try:
        wait_until(
            lambda: len([r for r in rows(world).values() if r[3] in SETTLED]) >= start + settled,
            60,
            f"{settled} more requests to settle",
        )
    finally:
        writers.stop()
    assert writers.errors == 0


def test_a_restored_queue_db_loses_no_new_entry_and_moves_no_money_twice(
    stage: Stage, world: World, tmp_path: Path
) -> None:
    pg_dump, pg_restore = pg_tool(stage.pg, "pg_dump"), pg_tool(stage.pg, "pg_restore")
    open_portfolios(world, ACCOUNTS)
    replica = stage.replica(workers=2)
    replica.wait_ready()
    write(world, 300)
    dump = tmp_path / "queue-db.dump"
    subprocess.run([str(pg_dump), "--format=custom", f"--file={dump}", f"--dbname={stage.dbs[0]}"], check=True)
    dumped = rows(world)
    write(world, 300)  # settled and applied after the dump: the restore loses them
    wait_caught_up(world)
    before = rows(world)
    lost = {key: row for key, row in before.items() if key not in dumped}
    assert len([r for r in lost.values() if r[3] in SETTLED]) >= 300

    # Steps 1, 2 and 4 of the runbook: pause, restore, resume. The writers wait meanwhile: their tables are replaced.
    assert replica.get("/api/v1/consistency/pause", "POST", {"reason": "restoring queue-db"})[0] == 200
    restore = [str(pg_restore), "--clean", "--if-exists", "--exit-on-error", f"--dbname={stage.dbs[0]}", str(dump)]
    subprocess.run(restore, check=True, capture_output=True)
    assert rows(world) == dumped
    assert replica.get("/api/v1/consistency/resume", "POST", {"reason": "queue-db restored"})[0] == 200
    write(world, 400)  # the requests after the restore get the lost rows' queue_ids back
    wait_caught_up(world)

    after = rows(world)
    applied_before = {key for key, row in lost.items() if row[3] in SETTLED}
    reused = {key for key in applied_before if key in after and after[key][3] not in ("PENDING", "PROCESSING")}
    listed = replica.get("/api/v1/consistency/reused-entries?limit=1000")[1]
    report = check_model(world, lost=[(queue, row) for (queue, _), row in lost.items()])
    doubled = world.p("SELECT count(*) - count(DISTINCT txn_id) FROM consistency.applied_entries")[0][0]
    drift = final_drift_check_counts(replica)

    figures = {"lost": len(lost), "reused": len(reused), "double_applications": doubled}
    record("queue-db restored", report, **figures)
    assert report.mismatches == [], report.mismatches[:20]
    assert doubled == 0
    assert len(reused) >= 100  # the restore really did hand the lost queue_ids out again
    assert {(e["queue"], e["queue_id"]) for e in listed["entries"]} == reused and listed["count"] == len(reused)
    assert {e["state"] for e in listed["entries"]} == {"applied"}
    # The runbook's check: no new entry left unapplied; the lost entries named, as reused or gone.
    still_there = {key for key in applied_before if key in after}
    assert drift["unapplied_entry"] == 0
    assert drift["reused_entry"] == len(still_there)
    assert drift["changed_entry"] == len(applied_before - still_there)


def final_drift_check_counts(replica: Replica) -> dict[str, int]:
    """Run a drift check through the API once none is running, and return its counts by kind."""
    report = final_drift_check(replica)
    assert report["state"] == "done", report
    return report["counts"]
