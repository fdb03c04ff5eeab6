"""GET /metrics through Flask's test client, after real cycles on real databases."""

from __future__ import annotations

import time

import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

import metrics
from db import DatabaseError
from service import service_of
from tests.world import World

ACCOUNT = "2000000001"
NO_PORTFOLIO = "2999999999"
FAMILIES = {
    "consistency_cycles": "counter",
    "consistency_entries": "counter",
    "consistency_batches": "counter",
    "consistency_cycle_duration_seconds": "histogram",
    "consistency_lag_seconds": "gauge",
    "consistency_parked_entries": "gauge",
    "consistency_corrections": "gauge",
    "consistency_last_success_timestamp_seconds": "gauge",
    "consistency_oldest_queue_transaction_seconds": "gauge",
    "consistency_db_pool_connections_in_use": "gauge",
    "consistency_paused": "gauge",
    "consistency_pause_started_timestamp_seconds": "gauge",
    "consistency_db_errors": "counter",
    "consistency_lease_taken": "counter",
}

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Parse Prometheus text: the type of each family, and every sample by name and labels."""
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def scrape(client) -> tuple[dict[str, str], Samples]:
    """GET /metrics and parse it."""
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain")
    return parse(answer.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    """Return one sample's value."""
    return samples[(name, frozenset(labels.items()))]


def entries(samples: Samples, queue: str, outcome: str) -> float:
    """Return consistency_entries_total for a queue and outcome."""
    return value(samples, "consistency_entries_total", queue=queue, outcome=outcome)


def test_every_family_is_served_with_its_type(client) -> None:
    types, samples = scrape(client)
    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    for database in ("queue-db", "user-portfolio-db"):
        assert ("consistency_db_pool_connections_in_use", frozenset({("database", database)})) in samples
        assert ("consistency_db_errors_total", frozenset({("database", database)})) in samples


def test_a_real_cycle_is_counted_by_result_queue_and_outcome(app, client, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    for _ in range(3):
        world.request("investment", ACCOUNT)
    world.request("investment", ACCOUNT, "CANCELLED")
    world.request("withdrawal", ACCOUNT, "FAILED")
    world.request("withdrawal", ACCOUNT)
    world.request("investment", NO_PORTFOLIO, txn=False)  # parked: no portfolio for the account
    world.request("investment", ACCOUNT, "PENDING")  # not settled: not counted
    _, before = scrape(client)

    summary = service_of(app).poller.run_once().to_json()
    _, after = scrape(client)

    assert summary["result"] == "ok"

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("consistency_cycles_total", result="ok") == 1
    assert grew("consistency_cycles_total", result="error") == 0
    # Batches of 4: the investments' second batch holds the entry with no portfolio and takes the careful way;
    # their first batch and the withdrawals' are clean.
    assert grew("consistency_batches_total", way="careful") == 1
    assert grew("consistency_batches_total", way="clean") == 2
    assert grew("consistency_cycle_duration_seconds_count") == 1
    assert grew("consistency_cycle_duration_seconds_sum") == pytest.approx(summary["duration_ms"] / 1000)
    expected = {
        ("investment", "COMPLETED"): 3,
        ("investment", "CANCELLED"): 1,
        ("investment", "parked"): 1,
        ("withdrawal", "COMPLETED"): 1,
        ("withdrawal", "FAILED"): 1,
    }
    for queue in ("investment", "withdrawal"):
        for outcome in ("COMPLETED", "FAILED", "CANCELLED", "parked"):
            got = entries(after, queue, outcome) - entries(before, queue, outcome)
            assert got == expected.get((queue, outcome), 0), (queue, outcome)
    assert world.applied() == 6
    assert value(after, "consistency_parked_entries") == len(world.parked()) == 1
    assert value(after, "consistency_lag_seconds") == 0
    assert time.time() - value(after, "consistency_last_success_timestamp_seconds") < 5
    assert value(after, "consistency_db_pool_connections_in_use", database="queue-db") == 0


def test_a_skipped_turn_and_a_failed_cycle_are_counted_apart(app, client, make_app, world: World) -> None:
    metrics.LAG.set(42)
    _, before = scrape(client)
    with world.cycle_lease_held():
        assert service_of(app).poller.run_once().to_json()["result"] == "skipped"
    broken = make_app(queue_db_uri="postgresql://svc@127.0.0.1:1/queue-db", db_connect_timeout=1)
    assert service_of(broken).poller.run_once().to_json()["result"] == "error"
    _, after = scrape(client)
    for result, grew in (("ok", 0), ("skipped", 1), ("error", 1)):
        name = "consistency_cycles_total"
        assert value(after, name, result=result) - value(before, name, result=result) == grew, result
    # Only cycles that ran are timed: the failed one.
    count = "consistency_cycle_duration_seconds_count"
    assert value(after, count) - value(before, count) == 1
    assert value(after, "consistency_lag_seconds") == 42  # neither tells anything new about the lag


def test_pool_gauge_counts_connections_lent_out(app, client) -> None:
    svc = service_of(app)
    with svc.queue_db.connection(), svc.portfolio_db.connection(), svc.portfolio_db.connection():
        _, lent = scrape(client)
    _, back = scrape(client)
    in_use = "consistency_db_pool_connections_in_use"
    assert value(lent, in_use, database="queue-db") - value(back, in_use, database="queue-db") == 1
    assert value(lent, in_use, database="user-portfolio-db") - value(back, in_use, database="user-portfolio-db") == 2


def test_lag_is_the_age_of_the_last_entry_read_while_a_drain_is_under_way(app, client, world: World, mocker) -> None:
    world.portfolio_for(ACCOUNT)
    requests = [world.request("investment", ACCOUNT) for _ in range(10)]  # batches of 4
    # An hour-old backlog: the queue's trigger stamps updated_at with now, so set it with the trigger off.
    world.q("ALTER TABLE investment_queue DISABLE TRIGGER USER")
    for age, request in enumerate(requests):
        world.q(
            "UPDATE investment_queue SET updated_at = now() - interval '1 hour' + %s * interval '1 minute'"
            " WHERE queue_id = %s",
            (age, request.queue_id),
        )
    world.q("ALTER TABLE investment_queue ENABLE TRIGGER USER")
    progress = service_of(app).poller.progress
    observe = metrics.observe_batch

    def stop_after_the_first_batch(last_read, applied) -> None:
        observe(last_read, applied)
        progress.stopping.set()  # as SIGTERM does: the cycle ends after this batch

    mocker.patch("metrics.observe_batch", side_effect=stop_after_the_first_batch)

    stopped = service_of(app).poller.run_once().to_json()
    _, during = scrape(client)

    assert stopped["stopped_early"] and stopped["counts"]["investment"]["COMPLETED"] == 4
    # The 4th entry read is 57 minutes old: every entry not applied yet is younger than that.
    assert 57 * 60 - 5 < value(during, "consistency_lag_seconds") < 57 * 60 + 5
    mocker.stopall()
    progress.stopping.clear()
    assert service_of(app).poller.run_once().to_json()["counts"]["investment"]["COMPLETED"] == 6
    _, drained = scrape(client)
    assert value(drained, "consistency_lag_seconds") == 0


def test_the_oldest_open_queue_transaction_is_a_gauge_set_by_each_ok_cycle(app, client, dbs) -> None:
    poller = service_of(app).poller
    writer = psycopg2.connect(dbs[0])
    with writer.cursor() as cur:
        cur.execute("SELECT 1")  # from here on, idle in transaction
    try:
        time.sleep(0.2)  # so that it is measurably old
        assert poller.run_once().to_json()["result"] == "ok"
        _, held = scrape(client)
    finally:
        writer.rollback()
        writer.close()
    assert poller.run_once().to_json()["result"] == "ok"
    _, after = scrape(client)

    assert value(held, "consistency_oldest_queue_transaction_seconds") >= 0.2
    assert value(after, "consistency_oldest_queue_transaction_seconds") == 0


def test_corrections_are_a_gauge_set_by_each_ok_cycle(app, client, world: World) -> None:
    poller = service_of(app).poller
    world.portfolio_for(ACCOUNT)
    request = world.request("investment", ACCOUNT)
    poller.run_once()
    assert value(scrape(client)[1], "consistency_corrections") == 0

    world.finish(request, "FAILED")
    poller.run_once()
    assert value(scrape(client)[1], "consistency_corrections") == 1

    world.finish(request, "COMPLETED")
    poller.run_once()
    assert value(scrape(client)[1], "consistency_corrections") == 0


def test_a_database_error_is_counted_once_with_its_database(app, client, make_app) -> None:
    svc = service_of(app)
    _, before = scrape(client)
    failing = pytest.raises(DatabaseError, match="user-portfolio-db: division by zero")
    with failing, svc.portfolio_db.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1/0")
    # A queue-db error inside a block that holds a user-portfolio-db connection too: counted for queue-db alone.
    failing = pytest.raises(DatabaseError, match="queue-db: division by zero")
    with failing, svc.portfolio_db.connection(), svc.queue_db.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1/0")
    # A connection that cannot be opened fails the cycle once: prepare() reaches queue-db and stops there.
    broken = make_app(queue_db_uri="postgresql://svc@127.0.0.1:1/queue-db", db_connect_timeout=1)
    assert service_of(broken).poller.run_once().to_json()["result"] == "error"
    with svc.portfolio_db.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")  # no error, nothing counted
    _, after = scrape(client)

    errors = "consistency_db_errors_total"
    for database, grew in (("queue-db", 2), ("user-portfolio-db", 1)):
        assert value(after, errors, database=database) - value(before, errors, database=database) == grew, database


def test_a_lease_taken_is_counted_by_each_cycle_that_ran_and_by_no_other(app, client, make_app, world: World) -> None:
    poller = service_of(app).poller
    taken = "consistency_lease_taken_total"
    _, before = scrape(client)
    assert poller.run_once().to_json()["result"] == "ok"
    _, ran = scrape(client)
    with world.cycle_lease_held():
        assert poller.run_once().to_json()["result"] == "skipped"
    # A cycle that fails before it has the lease (queue-db cannot be reached) takes none.
    broken = make_app(queue_db_uri="postgresql://svc@127.0.0.1:1/queue-db", db_connect_timeout=1)
    assert service_of(broken).poller.run_once().to_json()["result"] == "error"
    _, after = scrape(client)

    assert value(ran, taken) - value(before, taken) == 1
    assert value(after, taken) == value(ran, taken)
