"""Pause and resume: stored in the state schema, obeyed by every process and replica within a polling interval,
shown by /status and the metrics, audited under the token used, and nothing lost or doubled by it."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime

import pytest

from config import API_TOKEN_NAME
from queue_pass import QueuePass
from service import service_of
from tests.conftest import API_TOKEN
from tests.faults.conftest import Stage, _stage
from tests.faults.harness import API_TOKEN as REPLICA_TOKEN
from tests.faults.harness import Replica, Writers, check_model, open_portfolios, wait_caught_up
from tests.test_metrics import scrape, value
from tests.tokens import OPERATOR, READER
from tests.world import World, expected

ACCOUNT = "3000000001"
ACCOUNTS = [f"30000{n:05d}" for n in range(20)]
PAUSE, RESUME = "/api/v1/consistency/pause", "/api/v1/consistency/resume"
STATUS = "/api/v1/consistency/status"


@pytest.fixture
def app(make_app):
    """The app, accepting the operator, the reader and API_TOKEN; the poller not started."""
    flask_app = make_app(api_tokens=(OPERATOR, READER))
    service_of(flask_app).runner.prepare()
    return flask_app


@pytest.fixture
def client(app):
    """A test client of the app."""
    return app.test_client()


def post(client, path: str, body: object = None, token: str = OPERATOR.token):
    """POST an action with a token, and a JSON body when given."""
    return client.post(path, headers={"Authorization": f"Bearer {token}"}, json=body)


def audit_trail(world: World) -> list[tuple]:
    """Every audit record, oldest first: actor, action, target, reason, detail."""
    return world.p("SELECT actor, action, target, reason, detail FROM consistency.audit_log ORDER BY id")


def test_a_pause_needs_a_reason_and_an_operate_token(client, world: World) -> None:
    assert client.post(PAUSE, json={"reason": "maintenance"}).status_code == 401
    assert post(client, PAUSE, {"reason": "maintenance"}, READER.token).status_code == 403
    assert post(client, RESUME, None, READER.token).status_code == 403
    assert client.post(PAUSE, headers={"Authorization": f"Bearer {OPERATOR.token}"}).status_code == 415
    for body in ({}, {"reason": ""}, {"reason": None}, {"reason": ["x"]}):
        answer = post(client, PAUSE, body)
        assert (answer.status_code, answer.get_json()["field"]) == (400, "reason"), body
    for body in ([], "pause"):
        assert (post(client, PAUSE, body).get_json()["field"]) == "body"
    answer = post(client, PAUSE, {"reason": "maintenance", "until": "later"})
    assert (answer.status_code, answer.get_json()["field"]) == (400, "until")
    assert world.p("SELECT count(*) FROM consistency.pause") == [(0,)]
    assert audit_trail(world) == []


def test_a_pause_stops_applying_until_resumed_and_every_step_is_shown_and_audited(app, client, world) -> None:
    svc = service_of(app)
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1100000")
    _, before = scrape(client)

    paused = post(client, PAUSE, {"reason": "database maintenance"})

    assert paused.status_code == 200
    shown = paused.get_json()["paused"]
    assert (shown["paused_by"], shown["reason"]) == ("alice", "database maintenance")
    twice = post(client, PAUSE, {"reason": "me too"}, API_TOKEN)
    assert twice.status_code == 409
    assert twice.get_json()["pause"] == shown  # the pause in force is kept, with who paused and why
    assert twice.get_json()["error"] == f"applying is already paused by alice since {shown['paused_at']}"
    assert client.get(STATUS).get_json()["pause"] == shown
    assert client.get("/ready").status_code == 200
    _, during = scrape(client)
    assert value(during, "consistency_paused") == 1
    started = datetime.fromisoformat(shown["paused_at"]).timestamp()
    assert value(during, "consistency_pause_started_timestamp_seconds") == pytest.approx(started, abs=1e-3)

    requests = [world.request("investment", ACCOUNT) for _ in range(3)]
    triggered = client.post("/api/v1/consistency/trigger", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert (triggered.status_code, triggered.get_json()["result"]) == (200, "paused")
    for _ in range(3):
        assert svc.poller.run_once().to_json()["result"] == "paused"
    assert world.applied() == 0
    assert [world.txn_status(r.uuid) for r in requests] == ["PENDING"] * 3
    _, after = scrape(client)
    grew = value(after, "consistency_cycles_total", result="paused") - value(
        before, "consistency_cycles_total", result="paused"
    )
    assert grew == 4

    resumed = post(client, RESUME, {"reason": "maintenance done"}, API_TOKEN)

    assert resumed.status_code == 200
    assert resumed.get_json()["resumed_by"] == API_TOKEN_NAME and resumed.get_json()["pause"] == shown
    again = post(client, RESUME)
    assert (again.status_code, again.get_json()["error"]) == (409, "applying is not paused")
    assert client.get(STATUS).get_json()["pause"] is None
    _, later = scrape(client)
    assert value(later, "consistency_paused") == 0
    assert value(later, "consistency_pause_started_timestamp_seconds") == 0
    assert svc.poller.run_once().to_json()["result"] == "ok"
    svc.poller.run_once()
    assert world.applied() == 3
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", *[("1100000", "1000000")] * 3)
    trail = audit_trail(world)
    assert [(actor, action, target, reason) for actor, action, target, reason, _ in trail] == [
        ("alice", "pause", {"applying": "paused"}, "database maintenance"),
        (API_TOKEN_NAME, "resume", {"applying": "resumed"}, "maintenance done"),
    ]
    assert trail[1][4]["pause"] == shown and trail[1][4]["paused_for_s"] >= 0


def test_while_paused_the_status_says_so_though_the_last_cycle_that_ran_was_ok(app, client, world: World) -> None:
    svc = service_of(app)
    world.portfolio_for(ACCOUNT)
    assert svc.poller.run_once().outcome == "ok"
    post(client, PAUSE, {"reason": "database maintenance"})
    waiting = world.request("investment", ACCOUNT)

    assert svc.poller.run_once().outcome == "paused"
    svc.cache.forget()  # as another process would read it
    status = client.get(STATUS).get_json()

    assert status["applying"] == "paused"
    assert status["pause"]["reason"] == "database maintenance"
    assert status["last_cycle"]["result"] == "ok"  # the last cycle that ran, as it was
    assert status["this_process"]["last_attempt"]["result"] == "paused"
    assert status["backlog"]["queues"]["investment"]["oldest_waiting"]["queue_id"] == waiting.queue_id
    assert status["backlog"]["lag_s"] > 0
    post(client, RESUME, {"reason": "done"})
    assert client.get(STATUS).get_json()["applying"] == "running"


def test_a_long_drain_stops_at_the_next_batch_when_paused(svc, world: World, mocker) -> None:
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1100000")
    requests = [world.request("investment", ACCOUNT) for _ in range(4 * svc.settings.batch_size)]
    drain_page = QueuePass._drain_page

    def pause_after_the_first_batch(self, *args):
        read = drain_page(self, *args)
        world.p("INSERT INTO consistency.pause (paused_by, reason) VALUES ('bob', 'now') ON CONFLICT DO NOTHING")
        return read

    mocker.patch.object(QueuePass, "_drain_page", pause_after_the_first_batch)

    cut = svc.runner.run().to_json()

    assert (cut["result"], cut["stopped_early"]) == ("paused", True)
    assert cut["counts"]["investment"]["COMPLETED"] == svc.settings.batch_size  # the one batch before the pause
    assert world.applied() == svc.settings.batch_size
    idle = svc.runner.run().to_json()
    assert idle["result"] == "paused" and "counts" not in idle  # paused at the start: it reads nothing
    mocker.stopall()
    world.p("DELETE FROM consistency.pause")
    assert svc.runner.run().to_json()["result"] == "ok"
    assert world.applied() == len(requests)
    assert all(world.txn_status(r.uuid) == "PROCESSED" for r in requests)
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", *[("1100000", "1000000")] * len(requests))


@pytest.fixture
def stage(pg, dbs, exact_role, world, tmp_path) -> Iterator[Stage]:
    """A stage of replicas running as a least-privilege role (tests/faults/conftest.py)."""
    yield from _stage(pg, dbs, exact_role, world, tmp_path, read_all_stats=True)


def call(replica: Replica, path: str, body: object | None = None) -> tuple[int, str]:
    """Call a replica with the token, POSTing a JSON body when given; return the status and the text."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{replica.port}{path}", data=data)
    request.add_header("Authorization", f"Bearer {REPLICA_TOKEN}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback only
        return answer.status, answer.read().decode()


def settled_but_unapplied(world: World) -> int:
    """Count settled queue entries with no ledger record."""
    applied = set(world.p("SELECT queue, queue_id FROM consistency.applied_entries"))
    settled = {
        (queue, queue_id)
        for queue, table in (("investment", "investment_queue"), ("withdrawal", "withdrawal_queue"))
        for (queue_id,) in world.q(f"SELECT queue_id FROM {table} WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')")
    }
    return len(settled - applied)


def test_two_replicas_of_three_workers_obey_a_pause_and_then_apply_everything_once(stage: Stage, world) -> None:
    open_portfolios(world, ACCOUNTS)
    replicas = [stage.replica(workers=3), stage.replica(workers=3)]  # POLLING_INTERVAL 0.2 s
    for replica in replicas:
        replica.wait_ready()
    writers = Writers(world, ACCOUNTS, threads=2).start()
    try:
        time.sleep(1.5)
        status, text = call(replicas[0], PAUSE, {"reason": "failover drill"})
        assert status == 200
        time.sleep(1.0)  # one polling interval, and the batch a cycle may have been applying
        frozen = world.applied()
        time.sleep(2.0)  # ten polling intervals, with the writers settling entries all along
        assert world.applied() == frozen
        waiting = settled_but_unapplied(world)
        assert waiting > 20
        pause = json.loads(text)["paused"]
        # The last entry applied began to apply within a polling interval of the pause, in any process.
        last = world.p("SELECT max(applied_at) FROM consistency.applied_entries")[0][0]
        overrun = (last - datetime.fromisoformat(pause["paused_at"])).total_seconds()
        print(f"pause obeyed: last entry applied {overrun:+.3f}s after the pause; {waiting} entries waiting")
        assert overrun < 0.2
        answers = [json.loads(call(replica, STATUS)[1]) for replica in replicas]
        for replica, answer in zip(replicas, answers, strict=True):
            assert (answer["pause"], answer["applying"]) == (pause, "paused")
            assert answer["this_process"]["name"].startswith(f"{socket.gethostname()}:{replica.process.pid}:")
            assert answer["backlog"]["lag_s"] > 0  # the writers' entries wait
            assert replica.get("/ready")[0] == 200
            metrics_text = call(replica, "/metrics")[1]
            assert "\nconsistency_paused 1.0\n" in metrics_text
        # The deployment's state is the same whichever replica answers; the lease and the ages move on meanwhile.
        stable = ("applying", "pause", "last_cycle", "watermarks", "mode", "parked_entries", "tiers", "baseline")
        assert [{key: answer[key] for key in stable} for answer in answers[1:]] == [
            {key: answers[0][key] for key in stable}
        ]
    finally:
        writers.stop()
    assert world.applied() == frozen
    status, text = call(replicas[1], RESUME, {"reason": "drill over"})
    assert status == 200 and json.loads(text)["pause"] == pause
    wait_caught_up(world)
    report = check_model(world)
    assert report.mismatches == [], report.mismatches[:20]
    assert world.applied() >= frozen + waiting
    for replica in replicas:
        assert json.loads(call(replica, STATUS)[1])["pause"] is None
    trail = [(actor, action, reason) for actor, action, _, reason, _ in audit_trail(world)]
    assert trail == [(API_TOKEN_NAME, "pause", "failover drill"), (API_TOKEN_NAME, "resume", "drill over")]
