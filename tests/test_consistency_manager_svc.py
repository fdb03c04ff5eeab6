"""The HTTP API through Flask's test client, on real databases: probes, status, trigger, tier updates."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from decimal import Decimal

import pytest

import lease
import migrations
from queries import table_query
from service import service_of
from tests.conftest import API_TOKEN
from tests.test_plans import plan_nodes
from tests.world import World

ACCOUNT = "1000000001"
PASSWORD = "s3cret-pw-in-uri"


def stored_tiers(world: World) -> list[tuple]:
    """Read the stored tier values."""
    return world.p("SELECT tier, pool, market FROM consistency.tier_values ORDER BY tier")


def test_health_reflects_the_poller_thread(app, client) -> None:
    assert client.get("/health").status_code == 503
    service_of(app).poller.start()
    try:
        answer = client.get("/health")
        assert answer.status_code == 200
        assert answer.get_json() == {"status": "ok", "poller": "running"}
    finally:
        service_of(app).poller.stop()
    assert client.get("/health").status_code == 503


def test_ready_when_both_databases_answer_and_state_is_migrated(client) -> None:
    answer = client.get("/ready")
    assert answer.status_code == 200
    assert answer.get_json()["checks"] == {"queue-db": "ok", "user-portfolio-db": "ok"}


def test_not_ready_names_the_failing_database_without_its_password(make_app, world: World) -> None:
    world.p("DROP SCHEMA consistency CASCADE")
    unreachable = f"postgresql://svc:{PASSWORD}@127.0.0.1:1/queue-db"
    app = make_app(queue_db_uri=unreachable)
    answer = app.test_client().get("/ready")
    assert answer.status_code == 503
    checks = answer.get_json()["checks"]
    assert checks["queue-db"].startswith("unreachable: ")
    assert checks["user-portfolio-db"] == f"state schema at version None, needs {migrations.LATEST_VERSION}"
    assert PASSWORD not in answer.get_data(as_text=True)


def test_status_shows_tiers_deltas_watermarks_mode_and_the_last_cycle(app, client, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    world.request("investment", ACCOUNT)
    world.request("withdrawal", ACCOUNT, "FAILED")
    service_of(app).runner.run()

    body = client.get("/api/v1/consistency/status").get_json()

    assert body["tiers"]["TIER1"] == "1000000"
    assert body["tiers"]["deltas"] == {"del_t1_mv": "0", "del_t2_mv": "0", "del_t3_mv": "0"}
    assert set(body["watermarks"]) == {"investment", "withdrawal"}
    assert body["mode"] == "exact"
    assert body["polling_interval"] == 0.2
    assert body["parked_entries"] == 0
    last = body["last_cycle"]
    assert last["result"] == "ok"
    assert last["counts"]["investment"]["COMPLETED"] == 1
    assert last["counts"]["withdrawal"]["FAILED"] == 1
    assert last["duration_ms"] > 0
    assert "started_at" in last
    assert body["applying"] == "running"
    assert body["lease"]["holder"] is None  # given back at the end of the cycle
    assert body["backlog"]["lag_s"] == 0.0 and body["backlog"]["error"] is None
    assert {queue: shown["oldest_waiting"] for queue, shown in body["backlog"]["queues"].items()} == {
        "investment": None,
        "withdrawal": None,
    }


def test_status_is_served_from_the_kept_state_without_a_query_per_request(app, client, world: World, mocker) -> None:
    import service

    svc = service_of(app)
    svc.poller.run_once()  # a cycle, as the poller runs it, leaves the state read
    mocker.patch.object(service, "STATE_MAX_AGE", 60.0)  # however slow this machine, the kept state is young
    reads = mocker.spy(svc.portfolio_db, "transaction")
    probes = mocker.spy(svc.queue_db, "connection")

    answers = [client.get("/api/v1/consistency/status") for _ in range(50)]

    assert {a.status_code for a in answers} == {200}
    assert reads.call_count == 0
    assert probes.call_count == 1  # what waits in the queues, read for the first request after the cycle


def status_of(svc) -> dict:
    """The status a service answers, its kept state read again: as another process's request would find it."""
    svc.cache.forget()
    return svc.status()


def deployment(status: dict) -> dict:
    """The deployment's part of a status, the ages (which move on between two answers) left out."""
    shown = {key: value for key, value in status.items() if key != "this_process"}
    shown["lease"] = {key: value for key, value in shown["lease"].items() if key in ("holder", "epoch")}
    shown["backlog"] = {queue: each["oldest_waiting"] for queue, each in shown["backlog"]["queues"].items()}
    return shown


def test_every_process_answers_the_same_deployment_and_names_itself_apart(make_service, world: World) -> None:
    first, second = make_service(), make_service()  # two processes of the deployment
    world.portfolio_for(ACCOUNT)
    world.request("investment", ACCOUNT)
    assert first.poller.run_once().outcome == "ok"
    assert second.poller.run_once(0.0, fresh_for=60.0).outcome == "skipped"  # a cycle has just run: not its turn
    world.request("withdrawal", ACCOUNT)  # settled since: it waits

    answers = [status_of(first), status_of(second)]

    assert deployment(answers[0]) == deployment(answers[1])
    assert answers[0]["last_cycle"]["result"] == "ok"
    assert answers[0]["backlog"]["queues"]["withdrawal"]["oldest_waiting"] is not None
    for answer in answers:
        assert (
            answer["this_process"]["name"]
            == lease.this_process()
            == f"{socket.gethostname()}:{os.getppid()}:{os.getpid()}"
        )
    assert answers[0]["this_process"]["last_attempt"]["result"] == "ok"
    skipped = answers[1]["this_process"]["last_attempt"]
    assert skipped["result"] == "skipped" and skipped["lease_holder"] is None  # free, but a cycle had just started

    with world.cycle_lease_held():
        assert second.poller.run_once(0.3).outcome == "skipped"
        held = [status_of(first), status_of(second)]
    assert deployment(held[0]) == deployment(held[1])
    assert held[0]["lease"]["holder"] == "elsewhere:1:2" and held[0]["lease"]["expires_in_s"] > 3000
    assert held[1]["this_process"]["last_attempt"]["lease_holder"] == "elsewhere:1:2"
    assert held[0]["this_process"]["last_attempt"]["result"] == "ok"  # its own last attempt, not the other's


def test_the_backlog_grows_while_settled_entries_wait_and_is_nothing_once_they_are_applied(app, world: World) -> None:
    svc = service_of(app)
    world.portfolio_for(ACCOUNT)
    assert svc.poller.run_once().outcome == "ok"
    world.enqueue("investment", ACCOUNT)  # open: not this service's to apply yet
    assert status_of(svc)["backlog"]["lag_s"] == 0.0

    waiting = world.request("investment", ACCOUNT)
    first = status_of(svc)["backlog"]
    time.sleep(0.3)
    later = status_of(svc)["backlog"]

    assert first["queues"]["investment"]["oldest_waiting"]["queue_id"] == waiting.queue_id
    assert first["queues"]["withdrawal"]["oldest_waiting"] is None
    assert later["lag_s"] >= first["lag_s"] + 0.3 >= 0.3
    assert svc.poller.run_once().outcome == "ok"
    drained = status_of(svc)["backlog"]
    assert drained["lag_s"] == 0.0
    assert all(each["oldest_waiting"] is None for each in drained["queues"].values())


def test_the_backlog_probe_is_an_index_range_scan_however_long_the_history(world: World) -> None:
    world.q(
        "INSERT INTO investment_queue (account_number, uuid, status, updated_at)"
        " SELECT '1000000001', md5(n::text), 'COMPLETED', now() - (200000 - n) * interval '1 second'"
        " FROM generate_series(1, 200000) AS n"
    )
    world.q("ANALYZE investment_queue")
    read_to = world.q("SELECT updated_at, queue_id FROM investment_queue ORDER BY updated_at DESC LIMIT 1 OFFSET 10")[0]
    with world.queue.cursor() as cur:
        statement = table_query("queue_backlog", "investment_queue").as_string(cur)
        params = {"after_ts": read_to[0], "after_id": read_to[1], "scan": 1000}
        cur.execute("EXPLAIN (FORMAT JSON) " + statement, params)
        raw = cur.fetchone()[0]
        cur.execute(statement, params)
        found = cur.fetchone()
    plan = raw if isinstance(raw, list) else json.loads(raw)
    scans = [node for node in plan_nodes(plan[0]["Plan"]) if "Relation Name" in node]
    assert [(n["Node Type"], n.get("Index Name")) for n in scans] == [
        ("Index Scan", "investment_queue_updated_at_queue_id")
    ]
    assert "Index Cond" in scans[0]  # from the read point on, not a walk of the history
    assert (
        found[:2]
        == world.q(
            "SELECT updated_at, queue_id FROM investment_queue ORDER BY updated_at DESC, queue_id DESC LIMIT 1 OFFSET 9"
        )[0]
    )


def test_status_shows_this_process_s_changes_at_once_and_others_within_the_max_age(
    app, client, world: World, auth, mocker
) -> None:
    import service

    svc = service_of(app)
    world.portfolio_for(ACCOUNT)
    svc.poller.run_once()
    world.request("investment", ACCOUNT)
    svc.poller.run_once()
    assert client.get("/api/v1/consistency/status").get_json()["last_cycle"]["counts"]["investment"]["COMPLETED"] == 1

    client.post("/api/v1/consistency/update-tier-values", json={"TIER1_MV": "1100000"}, headers=auth)
    assert client.get("/api/v1/consistency/status").get_json()["tiers"]["TIER1_MV"] == "1100000"

    # Another process's change (here: straight to the database) shows once the kept state is older than allowed.
    world.p("UPDATE consistency.tier_values SET market = 1200000 WHERE tier = 1")
    mocker.patch.object(service, "STATE_MAX_AGE", 60.0)  # however slow this machine, the kept state is young
    assert client.get("/api/v1/consistency/status").get_json()["tiers"]["TIER1_MV"] == "1100000"
    mocker.patch.object(service, "STATE_MAX_AGE", 0.0)
    assert client.get("/api/v1/consistency/status").get_json()["tiers"]["TIER1_MV"] == "1200000"


def test_while_one_request_reads_the_state_the_others_get_the_kept_one(app, client, world: World, mocker) -> None:
    import threading

    import service

    svc = service_of(app)
    svc.poller.run_once()
    kept = client.get("/api/v1/consistency/status").get_json()
    mocker.patch.object(service, "STATE_MAX_AGE", 0.0)
    reading, release, finished = threading.Event(), threading.Event(), threading.Event()
    read_state = svc.cache.refresh

    def slow_read() -> dict:
        reading.set()
        release.wait(10)
        try:
            return read_state()
        finally:
            finished.set()

    mocker.patch.object(svc.cache, "refresh", side_effect=slow_read)
    slow = threading.Thread(target=lambda: client.get("/api/v1/consistency/status"))
    slow.start()
    try:
        assert reading.wait(10)
        answer = client.get("/api/v1/consistency/status")
        assert not finished.is_set()  # answered while the read in progress still waits: it did not queue behind it
    finally:
        release.set()
        slow.join(10)
    assert answer.status_code == 200
    assert answer.get_json()["last_cycle"] == kept["last_cycle"]


def test_trigger_runs_a_cycle_and_returns_its_result(app, client, world: World, auth) -> None:
    world.portfolio_for(ACCOUNT)
    request = world.request("investment", ACCOUNT)
    service_of(app).poller.start()
    try:
        answer = client.post("/api/v1/consistency/trigger", headers=auth)
    finally:
        service_of(app).poller.stop()
    assert answer.status_code == 200
    assert answer.get_json()["result"] == "ok"
    assert world.txn_status(request.uuid) == "PROCESSED"


def test_trigger_without_a_poller_thread_runs_the_cycle_itself(client, world: World, auth) -> None:
    world.portfolio_for(ACCOUNT)
    request = world.request("withdrawal", ACCOUNT, "CANCELLED")

    answer = client.post("/api/v1/consistency/trigger", headers=auth)

    assert answer.status_code == 200
    assert answer.get_json()["counts"]["withdrawal"]["CANCELLED"] == 1
    assert world.txn_status(request.uuid) == "CANCELLED"


def test_trigger_answers_409_when_the_turn_does_not_come(app, client, world: World, auth) -> None:
    with world.cycle_lease_held():
        service_of(app).poller.start()
        try:
            answer = client.post("/api/v1/consistency/trigger", headers=auth)
        finally:
            service_of(app).poller.stop()
    assert answer.status_code == 409
    assert "another process held the cycle turn" in answer.get_json()["error"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {API_TOKEN}"}],
)
@pytest.mark.parametrize("path", ["/api/v1/consistency/trigger", "/api/v1/consistency/update-tier-values"])
def test_post_endpoints_need_the_bearer_token(client, world: World, headers, path) -> None:
    before = stored_tiers(world)
    answer = client.post(path, headers=headers, json={"TIER1": "5"})
    assert answer.status_code == 401
    assert answer.get_json()["error"] == "missing or wrong bearer token"
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert stored_tiers(world) == before


def test_post_endpoints_are_disabled_without_an_api_token(make_app) -> None:
    app = make_app(api_token=None)
    answer = app.test_client().post("/api/v1/consistency/trigger", headers={"Authorization": "Bearer x"})
    assert answer.status_code == 401
    assert "set API_TOKEN or API_TOKENS_FILE" in answer.get_json()["error"]


def test_update_tier_values_changes_a_subset_and_returns_values_and_deltas(client, world: World, auth) -> None:
    answer = client.post(
        "/api/v1/consistency/update-tier-values", headers=auth, json={"TIER1_MV": 1100000, "TIER2": "2500000.25"}
    )

    assert answer.status_code == 200
    body = answer.get_json()["tiers"]
    assert body["TIER1_MV"] == "1100000"
    assert body["TIER2"] == "2500000.25"
    assert body["deltas"]["del_t1_mv"] == "0.1"
    want = ((Decimal("2000000") - Decimal("2500000.25")) / Decimal("2500000.25")).quantize(Decimal("1e-12"))
    assert Decimal(body["deltas"]["del_t2_mv"]) == want
    assert stored_tiers(world) == [
        (1, Decimal("1000000"), Decimal("1100000")),
        (2, Decimal("2500000.25"), Decimal("2000000")),
        (3, Decimal("500000"), Decimal("500000")),
    ]
    assert world.p("SELECT count(*) FROM consistency.tier_value_history WHERE old_pool IS NOT NULL") == [(2,)]


def test_update_tier_values_keeps_decimal_precision_of_json_numbers(client, world: World, auth) -> None:
    data = b'{"TIER3_MV": 500000.12345678}'
    answer = client.post(
        "/api/v1/consistency/update-tier-values", headers={**auth, "Content-Type": "application/json"}, data=data
    )
    assert answer.status_code == 200
    assert stored_tiers(world)[2][2] == Decimal("500000.12345678")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"TIER1": true}', "TIER1"),
        (b'{"TIER1": null}', "TIER1"),
        (b'{"TIER1": [1]}', "TIER1"),
        (b'{"TIER1": {"v": 1}}', "TIER1"),
        (b'{"TIER1": "abc"}', "TIER1"),
        (b'{"TIER1": "NaN"}', "TIER1"),
        (b'{"TIER1": NaN}', "body"),
        (b'{"TIER1_MV": Infinity}', "body"),
        (b'{"TIER1": "-Infinity"}', "TIER1"),
        (b'{"TIER1": 0}', "TIER1"),
        (b'{"TIER1": -5}', "TIER1"),
        (b'{"TIER1_MV": -0.01}', "TIER1_MV"),
        (b'{"TIER2": 1e12}', "TIER2"),
        (b'{"TIER2": 1e999999}', "TIER2"),
        (b'{"TIER2": "387128767E04304522"}', "TIER2"),  # found by schemathesis: abs() overflowed
        (b'{"TIER2_MV": 1e-999999999}', "TIER2_MV"),
        (b'{"TIER2": 1.123456789}', "TIER2"),
        (b'{"TIER4": 1}', "TIER4"),
        (b'{"TIER1": 5, "tier1": 5}', "tier1"),
        (b"{}", "body"),
        (b"[]", "body"),
        (b'"TIER1"', "body"),
        (b"{not json", "body"),
        (b"\xff\xfe", "body"),
        (b"[" * 2000 + b"]" * 2000, "body"),
    ],
)
def test_bad_tier_updates_get_400_naming_the_field_and_change_nothing(client, world: World, auth, body, field):
    before = stored_tiers(world)
    answer = client.post(
        "/api/v1/consistency/update-tier-values", headers={**auth, "Content-Type": "application/json"}, data=body
    )
    assert answer.status_code == 400
    assert answer.get_json()["field"] == field
    assert answer.get_json()["error"].startswith(f"{field}: ")
    assert stored_tiers(world) == before


def test_a_valid_key_beside_a_bad_one_is_not_stored(client, world: World, auth) -> None:
    before = stored_tiers(world)
    answer = client.post("/api/v1/consistency/update-tier-values", headers=auth, json={"TIER1_MV": 5, "TIER2": -1})
    assert answer.status_code == 400
    assert stored_tiers(world) == before


def test_tier_update_needs_json_content(client, world: World, auth) -> None:
    answer = client.post("/api/v1/consistency/update-tier-values", headers=auth, data="TIER1=5")
    assert answer.status_code == 415
    assert answer.get_json()["field"] == "body"


def test_an_oversized_body_gets_413(client, auth) -> None:
    body = b'{"TIER1": "' + b"1" * 5000 + b'"}'
    answer = client.post(
        "/api/v1/consistency/update-tier-values", headers={**auth, "Content-Type": "application/json"}, data=body
    )
    assert answer.status_code == 413
    assert "error" in answer.get_json()


@pytest.mark.parametrize("limit", ["0", "1001", "abc", "-1", "\u00b9", "\u0661", "9" * 5000, ""])
def test_parked_rejects_a_bad_limit(client, auth, limit) -> None:
    answer = client.get(f"/api/v1/consistency/parked?limit={limit}", headers=auth)
    assert answer.status_code == 400
    assert answer.get_json()["field"] == "limit"


@pytest.mark.parametrize("listing", ["parked", "corrections"])
def test_a_listing_refuses_a_repeated_or_bad_limit(client, auth, listing) -> None:
    for query in ("limit=5&limit=7", "limit=0", "limit=x"):
        answer = client.get(f"/api/v1/consistency/{listing}?{query}", headers=auth)
        assert (answer.status_code, answer.get_json()["field"]) == (400, "limit"), query
    assert client.get(f"/api/v1/consistency/{listing}?limit=5", headers=auth).status_code == 200


def test_unknown_paths_and_methods_answer_json(client) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404
    assert "error" in missing.get_json()
    wrong = client.get("/api/v1/consistency/trigger")
    assert wrong.status_code == 405
    assert "error" in wrong.get_json()


def test_status_is_503_not_500_when_the_portfolio_database_is_down(make_app) -> None:
    unreachable = f"postgresql://svc:{PASSWORD}@127.0.0.1:1/user-portfolio-db"
    app = make_app(portfolio_db_uri=unreachable)
    answer = app.test_client().get("/api/v1/consistency/status")
    assert answer.status_code == 503
    assert answer.get_json()["error"].startswith("user-portfolio-db is unavailable")
    assert PASSWORD not in answer.get_data(as_text=True)


def test_trigger_answers_202_while_a_slow_cycle_is_still_running(make_app, world: World, auth, dbs) -> None:
    import psycopg2

    app = make_app(trigger_wait=0.5, db_lock_timeout=4.0)
    service_of(app).runner.prepare()
    world.portfolio_for(ACCOUNT)
    world.request("investment", ACCOUNT)
    blocker = psycopg2.connect(dbs[1])
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLE user_portfolios IN EXCLUSIVE MODE")  # a held row would be skipped, not waited for
    service_of(app).poller.start()
    try:
        time.sleep(0.5)  # let the start-up cycle reach the locked row
        answer = app.test_client().post("/api/v1/consistency/trigger", headers=auth)
        # Blocked mid-cycle: the cycle waits on user-portfolio-db, and its queue-db reading session is not
        # left idle inside a transaction (that would hold back every replica's horizon).
        sessions = (
            "SELECT state FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'consistency-manager-svc'"
        )
        reading = [row[0] for row in world.q(sessions)]
        writing = [row[0] for row in world.p(sessions)]
    finally:
        blocker.rollback()
        blocker.close()
        service_of(app).poller.stop()
    assert answer.status_code == 202
    assert answer.get_json()["result"] == "running"
    assert "active" in writing  # the cycle, waiting for the table lock
    assert reading and "idle in transaction" not in reading


def test_trigger_answers_503_with_the_error_when_the_cycle_fails(make_app, auth) -> None:
    app = make_app(queue_db_uri=f"postgresql://svc:{PASSWORD}@127.0.0.1:1/queue-db")
    answer = app.test_client().post("/api/v1/consistency/trigger", headers=auth)
    assert answer.status_code == 503
    body = answer.get_json()
    assert body["result"] == "error"
    assert body["error"].startswith("queue-db: ")
    assert PASSWORD not in answer.get_data(as_text=True)


@pytest.mark.parametrize(
    "values",
    [
        {"TIER2": "0.00000001", "TIER2_MV": "1000000000"},
        {"TIER1": "0.00000001", "TIER1_MV": "999999999999.99999999"},
        {"TIER3": "999999999999.99999999", "TIER3_MV": "0"},
    ],
    ids=["delta-1e17", "largest-delta", "delta-minus-one"],
)
def test_any_accepted_tier_values_keep_every_answer_and_the_cycle_reports(
    client, world: World, auth, caplog, values
) -> None:
    world.portfolio_for(ACCOUNT)
    world.request("investment", ACCOUNT)

    updated = client.post("/api/v1/consistency/update-tier-values", headers=auth, json=values)
    status = client.get("/api/v1/consistency/status")
    with caplog.at_level(logging.INFO, logger="cycle"):
        triggered = client.post("/api/v1/consistency/trigger", headers=auth)

    assert (updated.status_code, status.status_code, triggered.status_code) == (200, 200, 200)
    tier = next(key for key in values if not key.endswith("_MV"))
    pool, market = Decimal(values[tier]), Decimal(values[f"{tier}_MV"])
    shown = updated.get_json()["tiers"]["deltas"][f"del_t{tier[4]}_mv"]
    assert abs(Decimal(shown) - (market - pool) / pool) < Decimal("1e-12") * max(1, abs((market - pool) / pool))
    assert status.get_json()["tiers"]["deltas"] == updated.get_json()["tiers"]["deltas"]
    assert [r.levelname for r in caplog.records if getattr(r, "event", None) == "cycle"] == ["INFO"]
