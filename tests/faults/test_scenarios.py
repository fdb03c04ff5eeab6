"""Fault injection: real service processes under kills, races, late commits, outages and locks, then the model check."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import psycopg2
import psycopg2.errors

from devkit import ROOT, postgres, roles
from devkit.net import wait_until
from tests.cluster import Cluster
from tests.faults.conftest import Stage, record
from tests.faults.harness import (
    Operator,
    Replica,
    TierUpdate,
    Writers,
    bulk_backlog,
    check_model,
    final_drift_check,
    open_portfolios,
    wait_caught_up,
)
from tests.world import TABLES, World

ACCOUNTS = [f"40000{n:05d}" for n in range(40)]


def assert_model(
    world: World,
    scenario: str,
    min_settled: int,
    writers: Writers | None = None,
    tier_updates: list[TierUpdate] | None = None,
    **figures: object,
) -> None:
    """Run the model check, record its figures, and fail on any mismatch, on any database error of the writers
    (only the outage scenario expects some, and passes no writers), or on fewer settled entries than the scenario
    must have checked."""
    report = check_model(world, tier_updates=tier_updates)
    if writers is not None:
        figures["writer_errors"] = writers.errors
    record(scenario, report, **figures)
    assert report.mismatches == [], report.mismatches[:20]
    assert report.completed > 0 and report.settled >= min_settled, (report.completed, report.settled, min_settled)
    if writers is not None:
        assert writers.failures == [], writers.failures[:5]


def lease_held_inside_a_transaction(world: World, replica: Replica) -> bool:
    """Tell whether a process of this replica holds the cycle lease right now, with its session inside a
    transaction: the lease's holder is host:master_pid:worker_pid, and backend_pid its session."""
    try:
        ((holder, state),) = world.p(
            "SELECT l.holder, a.state FROM consistency.cycle_lease l"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.backend_pid"
        )
    except psycopg2.errors.UndefinedTable:  # the first replica has not migrated yet
        return False
    ours = holder is not None and holder.rsplit(":", 2)[1] == str(replica.process.pid)
    return ours and state in ("active", "idle in transaction")


def kill_inside_if_possible(world: World, replica: Replica, aim: float) -> bool:
    """SIGKILL a replica, waiting up to `aim` seconds for a moment it holds the lease inside a transaction; tell
    whether the kill landed at such a moment, as read right before it."""
    deadline = time.monotonic() + aim
    inside = lease_held_inside_a_transaction(world, replica)
    while not inside and time.monotonic() < deadline:
        time.sleep(0.005)
        inside = lease_held_inside_a_transaction(world, replica)
    replica.kill_group()
    return inside


def kill_replicas(
    stage: Stage,
    world: World,
    writers: Writers,
    kills: int,
    pause: tuple[float, float],
    operator: Operator | None = None,
    aim: float = 0.0,
    **env: str,
) -> int:
    """SIGKILL replicas one after another while the writers write (and the operator acts), then catch up; count the
    kills that landed inside a transaction of the killed replica's cycle. Every other kill comes at a random moment;
    with `aim`, the others come at the first moment of such a transaction, within `aim` seconds."""
    rng = random.Random(kills)
    inside = 0
    try:
        for n in range(kills):
            replica = stage.replica(workers=2, **env)
            wait_until(lambda r=replica: r.get("/health")[0] == 200, 30, "the replica to start")
            aimed = aim if n % 2 else 0.0
            time.sleep(0.0 if aimed else rng.uniform(*pause))
            inside += kill_inside_if_possible(world, replica, aimed)
    finally:
        writers.stop()
        if operator is not None:
            operator.stop()
    stage.replica(workers=2).wait_ready()
    wait_caught_up(world)
    return inside


def test_sigkill_storm_loses_and_doubles_nothing(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    bulk_backlog(world, ACCOUNTS, 12000)
    # A replica that stays, through which an operator changes the tier values, pauses, resumes and starts drift
    # checks all along; every replica also schedules checks, which the kills interrupt and others resume.
    steady = stage.replica(workers=1, DRIFT_CHECK_INTERVAL="2")
    steady.wait_ready()
    operator = Operator(steady).start()
    writers = Writers(world, ACCOUNTS).start()
    inside = kill_replicas(stage, world, writers, 12, (0.05, 0.6), operator, aim=2.0, DRIFT_CHECK_INTERVAL="2")
    report = final_drift_check(steady)
    paused, checks = operator.actions["pause 200"], operator.actions["drift-checks 202"]
    updates = operator.actions["update-tier-values 200"]
    figures = {"pauses": paused, "tier_changes": updates, "drift_checks_started": checks}
    assert_model(
        world,
        "sigkill storm",
        12000 + 500,
        writers,
        operator.tier_updates,
        kills=12,
        kills_inside_the_holders_transaction=inside,
        **figures,
        final_findings=sum(report["counts"].values()),
    )
    assert inside >= 3  # kills of the lease holder, its session inside a transaction of its cycle
    assert operator.unexpected() == []  # no 5xx, and no call without an answer
    assert paused >= 3 and operator.actions["resume 200"] >= 3 and updates >= 3
    assert report["state"] == "done" and not any(report["counts"].values()), report


def test_duplicate_and_requeued_rows_under_sigkills_move_money_once_per_transaction(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    writers = Writers(world, ACCOUNTS, threads=3, duplicates=0.3).start()
    kills = 6
    kill_replicas(stage, world, writers, kills, (0.3, 1.0))
    doubled = world.p(
        "SELECT count(*) FROM (SELECT txn_id FROM consistency.applied_entries"
        " WHERE txn_id IS NOT NULL GROUP BY txn_id HAVING count(*) > 1) AS d"
    )[0][0]
    figures = {"writer_threads": 3, "kills": kills, "respelled": writers.respelled, "requeued": writers.requeued}
    assert_model(world, "duplicates and re-queues", 500, writers, **figures, double_applications=doubled)
    assert doubled == 0
    assert writers.respelled >= 20 and writers.requeued >= 20  # the writers really did name transactions again


def test_two_replicas_of_three_workers_with_a_master_killed(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    first, second = stage.replica(workers=3), stage.replica(workers=3)
    first.wait_ready()
    second.wait_ready()
    writers = Writers(world, ACCOUNTS, threads=3).start()
    try:
        time.sleep(3)
        first.kill_master()
        time.sleep(3)
    finally:
        writers.stop()
    wait_caught_up(world)
    assert second.terminate() == 0
    assert_model(world, "many appliers", 500, writers, replicas=2, workers_each=3, masters_killed=1)


def late_writers(world: World, hold: float, rounds: int, stats: dict) -> None:
    """Settle entries in transactions held open for `hold` seconds; commit two of three, roll back the third."""
    for n in range(rounds):
        request = world.enqueue("investment" if n % 2 else "withdrawal", ACCOUNTS[n % len(ACCOUNTS)])
        writer = world.finish_uncommitted(request)
        later = world.request("investment", ACCOUNTS[(n + 1) % len(ACCOUNTS)])
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and world.txn_status(later.uuid) != "PROCESSED":
            time.sleep(0.05)
        stats["later_applied_while_open"] += world.txn_status(later.uuid) == "PROCESSED"
        time.sleep(max(0.0, deadline - time.monotonic()))
        if n % 3 == 2:
            writer.rollback()
            stats["rolled_back"] += 1
        else:
            writer.commit()
            stats["late_commits"] += 1


def test_late_and_rolled_back_writers(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    stage.replica(workers=2, POLLING_INTERVAL="0.3").wait_ready()
    stats = {"late_commits": 0, "rolled_back": 0, "later_applied_while_open": 0}
    writers = Writers(world, ACCOUNTS).start()
    try:
        late_writers(world, hold=1.0, rounds=6, stats=stats)  # 1.0 s > 3 polling intervals
    finally:
        writers.stop()
    wait_caught_up(world)
    assert stats["later_applied_while_open"] == 6
    assert_model(world, "late and rolled back", 400, writers, hold_s=1.0, **stats)


def test_least_privilege_lookback_loses_nothing(lookback_stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    replica = lookback_stage.replica(workers=2, LOOKBACK_WINDOW="4", RECONCILE_INTERVAL="2", POLLING_INTERVAL="0.3")
    replica.wait_ready()
    # The status shows kept state up to a second old: it may predate every worker's first cycle.
    wait_until(lambda: replica.get("/api/v1/consistency/status")[1]["mode"] == "lookback", 5, "look-back mode")
    stats = {"late_commits": 0, "rolled_back": 0, "later_applied_while_open": 0}
    writers = Writers(world, ACCOUNTS).start()
    try:
        late_writers(world, hold=2.5, rounds=4, stats=stats)  # past the drain's reading, within the 4 s bound
    finally:
        writers.stop()
    wait_caught_up(world, timeout=30)
    reconciled = world.p("SELECT count(*) FROM consistency.applied_entries")[0][0]
    assert_model(world, "least privilege", 600, writers, lookback_s=4, hold_s=2.5, applied=reconciled, **stats)


def rows_read(replica: Replica) -> tuple[int, int]:
    """What a replica's cycles read from queue-db, as their summary lines count it: by the drain, by the sweep."""
    cycles = [json.loads(line) for line in replica.log.read_text().splitlines() if '"event": "cycle"' in line]
    counts = [c for cycle in cycles if cycle.get("counts") for c in cycle["counts"].values()]
    return sum(c["read"] for c in counts), sum(c["swept"] for c in counts)


def test_least_privilege_lookback_reads_what_changed_not_the_history(lookback_stage: Stage, world: World) -> None:
    accounts = [f"43000{n:05d}" for n in range(200)]
    open_portfolios(world, accounts + ACCOUNTS)
    bulk_backlog(world, accounts, 30000)  # the history
    newest = {queue: world.q(f"SELECT max(updated_at) FROM {table}")[0][0] for queue, table in TABLES.items()}
    env = {"LOOKBACK_WINDOW": "3", "RECONCILE_INTERVAL": "1", "POLLING_INTERVAL": "0.3", "LISTEN_NOTIFY": "false"}
    first = lookback_stage.replica(workers=2, **env)
    wait_caught_up(world, timeout=120)

    def swept_past() -> bool:
        return all(ts >= newest[queue] for queue, ts in world.p("SELECT queue, updated_at FROM consistency.watermarks"))

    wait_until(swept_past, 30, "a sweep past the history")
    assert first.terminate() == 0
    replica = lookback_stage.replica(workers=2, **env)
    stats = {"late_commits": 0, "rolled_back": 0, "later_applied_while_open": 0}
    writers = Writers(world, accounts, pause=0.05).start()
    try:
        late_writers(world, hold=1.5, rounds=6, stats=stats)  # sweeps every second, all through
    finally:
        writers.stop()
    wait_caught_up(world, timeout=60)
    assert replica.terminate() == 0
    drained, swept = rows_read(replica)
    changed = sum(writers.settled.values()) + 2 * 6  # and each round of the late writers settles two

    # Every entry is read about once by the drain and once per sweep that its LOOKBACK_WINDOW spans (3 here),
    # however long the history: the sweeps of the whole history would be 30,000 rows each, every second.
    assert drained < 4 * changed and swept < 6 * changed < 30000, (drained, swept, changed)
    figures = {"history": 30000, "changed": changed, "drained": drained, "swept": swept}
    assert_model(world, "look-back at scale", 30000 + 100, writers, **figures, **stats)


def test_database_outage_recovers_without_restart(exact_role: str, tmp_path) -> None:
    cluster = Cluster()
    try:
        postgres.admin(cluster.uri, f"CREATE ROLE {exact_role} LOGIN")
        names = []
        for prefix, ddl in (("outage_queue", "queue_db.sql"), ("outage_portfolio", "user_portfolio_db.sql")):
            names.append(postgres.create_template(cluster.uri, prefix, ROOT / "schema" / ddl))
        roles.apply_grants(cluster.uri, exact_role, *names, read_all_stats=True)
        dbs = (postgres.with_database(cluster.uri, names[0]), postgres.with_database(cluster.uri, names[1]))
        world = World(*dbs)
        stage = Stage(cluster.uri, dbs, exact_role, world, tmp_path)
        try:
            _outage(stage, world, cluster)
        finally:
            for replica in stage.replicas:
                replica.cleanup()
            world.close()
            print(stage.log_text()[-6000:])
    finally:
        cluster.destroy()


def _outage(stage: Stage, world: World, cluster: Cluster) -> None:
    """Stop the server mid-run; probes must tell the truth, and the service must recover by itself."""
    open_portfolios(world, ACCOUNTS)
    replica = stage.replica(workers=2)
    replica.wait_ready()
    writers = Writers(world, ACCOUNTS).start()
    time.sleep(2)
    cluster.stop()
    world.close()
    health, ready = [], []
    for _ in range(10):
        health.append(replica.get("/health")[0])
        ready.append(replica.get("/ready")[0])
        time.sleep(0.3)
    cluster.start()
    replica.wait_ready(timeout=30)
    time.sleep(2)
    writers.stop()
    world.__init__(*stage.dbs)
    wait_caught_up(world)
    assert set(health) == {200}
    assert set(ready) == {503}
    assert replica.process.poll() is None  # the same process throughout
    assert stage.log_text().count("Booting worker") == 2  # and the same two workers: none restarted
    # The writers meet the outage too: their errors are expected here, and only counted.
    assert_model(world, "database outage", 400, outage_s=3, writer_errors=writers.errors, restarts=0)


def last_error(replica: Replica) -> str:
    """Return the error of the last cycle this replica's worker attempted, if any."""
    status = replica.get("/api/v1/consistency/status")[1]
    attempt = status.get("this_process", {}).get("last_attempt") or {}
    return attempt.get("error") or ""


def test_stuck_database_fails_cleanly_and_liveness_sees_a_stuck_poller(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    timed = stage.replica(workers=1, DB_LOCK_TIMEOUT="0.5", DB_STATEMENT_TIMEOUT="1", LIVENESS_TIMEOUT="5")
    timed.wait_ready()
    blocker = psycopg2.connect(stage.dbs[1])
    with blocker.cursor() as cur:  # the service's own row, which every drain that moves updates: it waits for it
        cur.execute("SELECT 1 FROM consistency.watermarks WHERE queue = 'investment' FOR UPDATE")
    writers = Writers(world, ACCOUNTS).start()
    request = world.request("investment", ACCOUNTS[0])
    wait_until(lambda: "lock timeout" in last_error(timed), 15, "a cycle to fail on the lock")
    failing_cycles_health = timed.get("/health")[0]
    assert timed.terminate() == 0

    patient = stage.replica(workers=1, DB_LOCK_TIMEOUT="600", DB_STATEMENT_TIMEOUT="600", LIVENESS_TIMEOUT="2")
    wait_until(lambda: patient.get("/health")[1].get("poller") == "stuck", 20, "liveness to report a stuck poller")
    stuck = patient.get("/health")
    blocker.rollback()
    blocker.close()
    wait_until(lambda: world.txn_status(request.uuid) == "PROCESSED", 20, "the blocked entry to apply")
    wait_until(lambda: patient.get("/health")[0] == 200, 10, "liveness to recover")
    writers.stop()
    wait_caught_up(world)
    assert failing_cycles_health == 200
    assert stuck[0] == 503
    assert_model(world, "stuck database", 300, writers, lock_timeout_s=0.5, liveness_timeout_s=2)


def settle_to_apply_seconds(world: World, since: float, until: float, left_out: set[str]) -> list[float]:
    """Seconds from each entry settling in the window to its transaction's update, for the other accounts."""
    settled = {}
    for table in TABLES.values():
        rows = world.q(
            f"SELECT uuid, extract(epoch FROM updated_at) FROM {table}"
            " WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND account_number <> ALL (%s)"
            " AND updated_at BETWEEN to_timestamp(%s) AND to_timestamp(%s)",
            (list(left_out), since, until),
        )
        settled.update(rows)
    applied = dict(
        world.p(
            "SELECT id::text, extract(epoch FROM updated_at) FROM portfolio_transactions WHERE id::text = ANY (%s)",
            (list(settled),),
        )
    )
    return [float(applied[uuid] - at) for uuid, at in settled.items()]


def test_a_row_held_for_a_minute_delays_only_its_account(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    held_portfolio, held_transaction = ACCOUNTS[0], ACCOUNTS[1]
    blocked = world.request("investment", held_transaction)
    holder = psycopg2.connect(stage.dbs[1])
    with holder.cursor() as cur:  # what another service's UPDATE takes: the writers' inserts still go through
        cur.execute("SELECT 1 FROM user_portfolios WHERE accountid = %s FOR NO KEY UPDATE", (held_portfolio,))
        cur.execute("SELECT 1 FROM portfolio_transactions WHERE id = %s FOR NO KEY UPDATE", (blocked.uuid,))
    replica = stage.replica(workers=2, POLLING_INTERVAL="2")
    writers = Writers(world, ACCOUNTS, pause=0.02).start()
    since = time.time()
    time.sleep(30)
    _, parked = replica.get("/api/v1/consistency/parked")
    time.sleep(30)
    until = time.time()
    holder.rollback()
    holder.close()
    wait_until(lambda: world.txn_status(blocked.uuid) == "PROCESSED", 20, "the blocked entry to apply")
    writers.stop()
    wait_caught_up(world)

    waits = sorted(settle_to_apply_seconds(world, since, until, {held_portfolio, held_transaction}))
    assert {entry["account_number"] for entry in parked["entries"]} == {held_portfolio, held_transaction}
    assert {entry["reason"].startswith("waiting for a row lock") for entry in parked["entries"]} == {True}
    assert f"waiting for a row lock on portfolio {held_portfolio}" in {entry["reason"] for entry in parked["entries"]}
    assert len(waits) > 100
    assert waits[-1] <= 2 * 2.0, waits[-10:]  # two polling intervals
    assert stage.log_text().count("consistency cycle failed") == 0
    assert world.p("SELECT count(*) FROM consistency.parked_entries") == [(0,)]
    figures = {"median_wait_s": round(waits[len(waits) // 2], 2), "max_wait_s": round(waits[-1], 2)}
    assert_model(world, "row held 60 s", 1000, writers, **figures)


def lease_row(world: World) -> tuple[str | None, int]:
    """The cycle lease's holder (None when free) and epoch."""
    return world.p("SELECT holder, epoch FROM consistency.cycle_lease")[0]


def test_a_frozen_lease_holder_is_replaced_within_the_lease_and_its_late_writes_are_refused(
    stage: Stage, world: World
) -> None:
    accounts = [f"42000{n:05d}" for n in range(200)]  # ~50 completions each, as below: no tier value overflows
    open_portfolios(world, accounts)
    bulk_backlog(world, accounts, 30000)  # a drain of several seconds: its worker holds the lease throughout
    lease_s = 6.0
    frozen = stage.replica(workers=2, CYCLE_LEASE=str(lease_s), BATCH_SIZE="100")
    wait_until(lambda: world.applied() > 500, 30, "the drain to be under way")
    other = stage.replica(workers=1, CYCLE_LEASE=str(lease_s), BATCH_SIZE="100")
    other.wait_ready()
    writers = Writers(world, accounts, pause=0.02).start()
    holder, epoch = lease_row(world)
    assert holder is not None and holder.split(":")[1] == str(frozen.process.pid), holder
    pid = int(holder.split(":")[2])
    os.kill(pid, signal.SIGSTOP)
    stopped_at, applied_at_stop = time.monotonic(), world.applied()
    health = []
    try:
        while lease_row(world)[1] == epoch and time.monotonic() - stopped_at < 3 * lease_s:
            health.append(frozen.get("/health")[0])
            time.sleep(0.2)
        taken_over = time.monotonic() - stopped_at
        wait_until(lambda: world.applied() > applied_at_stop + 100, 20, "entries to flow again")
        flowing = time.monotonic() - stopped_at
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(2)  # the resumed worker's next transaction meets the fence, or its ended session
    writers.stop()
    wait_caught_up(world, timeout=120)

    assert taken_over <= lease_s + 1.0
    assert flowing <= lease_s + 3.0
    assert 503 in health  # the frozen worker's replica says so while it holds the lease
    # Resumed, the frozen worker's cycle fails: at the fence, or because the server ended its idle transaction.
    refused = ("was lost: another process holds it now", "server closed the connection unexpectedly")
    failed = [line for line in stage.log_text().splitlines() if f'"pid": {pid}' in line and '"result": "error"' in line]
    assert any(text in line for text in refused for line in failed), failed
    figures = {"lease_s": lease_s, "taken_over_s": round(taken_over, 2), "flowing_s": round(flowing, 2)}
    assert_model(world, "frozen holder", 30000 + 50, writers, **figures)


def cycles_started(world: World) -> int:
    """How many cycles have started, on every process: each draws the next cycle number."""
    return world.p("SELECT last_value FROM consistency.cycles")[0][0]


def test_one_cycle_per_interval_with_two_replicas_of_three_workers(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    world.q((ROOT / "schema" / "queue_notify.sql").read_text())
    replicas = [stage.replica(workers=3, POLLING_INTERVAL="1") for _ in range(2)]
    for replica in replicas:
        replica.wait_ready()
    time.sleep(2)
    first = cycles_started(world)
    time.sleep(10)
    idle = cycles_started(world) - first

    request = world.request("investment", ACCOUNTS[0])
    settled = time.monotonic()
    wait_until(lambda: world.txn_status(request.uuid) == "PROCESSED", 5, "the notified entry to apply", interval=0.02)
    notified = time.monotonic() - settled
    before = cycles_started(world)
    status, answer = replicas[0].get("/api/v1/consistency/trigger", "POST")

    assert 8 <= idle <= 11  # ten seconds at POLLING_INTERVAL=1: six pollers, one cycle a second
    assert notified < 0.9  # a notification still gets a cycle at once, not at the next interval
    assert (status, answer["result"]) == (200, "ok")  # and so does a manual trigger
    assert cycles_started(world) > before
    assert_model(world, "one cycle per interval", 1, replicas=2, workers_each=3, idle_cycles_in_10_s=idle)


def test_sigterm_stops_within_ten_seconds_mid_backlog(stage: Stage, world: World) -> None:
    accounts = [f"41000{n:05d}" for n in range(200)]  # ~50 completions each: no tier value overflows
    open_portfolios(world, accounts)
    bulk_backlog(world, accounts, 30000)
    replica = stage.replica(workers=2, BATCH_SIZE="200")
    wait_until(lambda: world.applied() > 1000, 30, "the drain to be under way")
    started = time.monotonic()
    code = replica.terminate(timeout=10)
    took = time.monotonic() - started
    applied_at_stop = world.applied()
    assert code == 0
    assert took < 10
    assert applied_at_stop < settled_count(world)  # it stopped mid-backlog
    stage.replica(workers=2).wait_ready()
    wait_caught_up(world)
    assert_model(world, "graceful stop", 30000, stop_s=round(took, 2), applied_at_stop=applied_at_stop)


def settled_count(world: World) -> int:
    """Count terminal queue entries."""
    from tests.faults.harness import settled_in_queues

    return settled_in_queues(world)


def test_parked_entries_apply_once_when_fixed_under_writers(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    stage.replica(workers=2).wait_ready()
    newcomer = "4999999999"
    writers = Writers(world, ACCOUNTS).start()
    try:
        waiting = [
            world.request(queue, newcomer, status, txn=False)
            for queue, status in (
                ("investment", "COMPLETED"),
                ("investment", "COMPLETED"),
                ("withdrawal", "COMPLETED"),
                ("withdrawal", "CANCELLED"),
            )
        ]
        wait_until(lambda: len(world.parked()) == len(waiting), 10, "the newcomer's entries to be parked")
        time.sleep(1)
        world.portfolio_for(newcomer, ("1000.00", "2000.00", "3000.00"), ("100.00", "200.00", "300.00"))
        for request in waiting:
            world.transaction_for(request.queue, newcomer, request.uuid)
        wait_until(lambda: world.parked() == {}, 10, "the parked entries to apply")
        time.sleep(1)
    finally:
        writers.stop()
    wait_caught_up(world)
    assert [world.txn_status(r.uuid) for r in waiting] == ["PROCESSED", "PROCESSED", "PROCESSED", "CANCELLED"]
    assert_model(world, "parked then fixed", 150, writers, parked=len(waiting))


def test_no_credential_in_any_answer_or_log_line(stage: Stage, world: World) -> None:
    password = "Pa55-w0rd-in-the-uri"
    replica = stage.replica(
        workers=2,
        QUEUE_DB_URI=f"postgresql://svc:{password}@127.0.0.1:1/queue-db",
        USER_PORTFOLIO_DB_URI=f"postgresql://svc:{password}@127.0.0.1:1/user-portfolio-db",
        LOG_LEVEL="DEBUG",
    )
    wait_until(lambda: replica.get("/health")[0] == 200, 30, "the replica to start")
    answers = [
        replica.get(path, method)
        for path, method in (
            ("/health", "GET"),
            ("/ready", "GET"),
            ("/api/v1/consistency/status", "GET"),
            ("/api/v1/consistency/parked", "GET"),
            ("/api/v1/consistency/trigger", "POST"),
            ("/api/v1/openapi.json", "GET"),
        )
    ]
    time.sleep(1)
    assert replica.terminate() == 0
    logs = stage.log_text()
    assert [code for code, _ in answers] == [200, 503, 503, 503, 503, 200]
    assert "unreachable" in str(answers[1][1])
    assert password not in str(answers)
    assert password not in logs
    assert "fault-token" not in logs  # the bearer token is never logged either
    assert "consistency cycle failed" in logs
