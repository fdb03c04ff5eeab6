"""End to end: the real service process, under gunicorn and under python, against real databases."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devkit import ROOT, gunicorn
from devkit.net import free_port, wait_until
from tests.conftest import API_TOKEN
from tests.manifests import termination_grace_period
from tests.test_metrics import FAMILIES, Samples, parse
from tests.world import World, expected

ACCOUNTS = [f"30000000{n:02d}" for n in range(6)]
ORPHAN = "3999999999"
# tier, pool, market (set through the API), and each portfolio's starting value and allocation.
TIERS = [
    (1, "1000000", "1100000", "1000.00", "100.00"),
    (2, "2000000", "1950000", "2000.00", "200.00"),
    (3, "500000", "525000", "3000.00", "300.00"),
]


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """Make one HTTP request to the service; return the status and the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {API_TOKEN}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as answer:  # noqa: S310 - loopback only
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@contextmanager
def running(command: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Iterator[subprocess.Popen]:
    """Run the service as a child process logging to a file, stop it if the test has not, and show the log's end."""
    try:
        with gunicorn.running(command, env, log, cwd) as process:
            yield process
    finally:
        print(log.read_text()[-4000:])


@pytest.fixture
def service_env(dbs: tuple[str, str]) -> dict[str, str]:
    """The environment a deployment would give the service, aimed at the test's databases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIER", "POLLING", "PORT", "BATCH"))}
    env.update(
        QUEUE_DB_URI=dbs[0],
        USER_PORTFOLIO_DB_URI=dbs[1],
        POLLING_INTERVAL="0.3",
        PORT=str(free_port()),
        API_TOKEN=API_TOKEN,
        BATCH_SIZE="7",
    )
    return env


def test_gunicorn_applies_concurrent_traffic_exactly_once(service_env, world: World, tmp_path) -> None:
    for account in ACCOUNTS:
        world.portfolio_for(account)
    port = int(service_env["PORT"])
    command = gunicorn.command("--workers", "3")
    temporary = tmp_path / "tmp"  # gunicorn's worker_tmp_dir, where it makes the metrics directory
    temporary.mkdir()
    with running(command, {**service_env, "TMPDIR": str(temporary)}, tmp_path / "gunicorn.log") as process:
        wait_until(lambda: call(port, "GET", "/ready")[0] == 200, 30, "readiness")
        assert len(list(temporary.glob("consistency-metrics-*/*.db"))) >= 3  # each worker's files, in one place
        markets = {f"TIER{tier}_MV": market for tier, _, market, _, _ in TIERS}
        assert call(port, "POST", "/api/v1/consistency/update-tier-values", markets)[0] == 200
        time.sleep(1.0)  # a cycle that loaded the old values before the update has finished by now
        # Settle each request once, so its terminal status is known.
        rng = random.Random(11)
        settled: dict[str, tuple[str, str, str]] = {}
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            queue = rng.choice(["investment", "withdrawal"])
            orphan = rng.random() < 0.05
            account = ORPHAN if orphan else rng.choice(ACCOUNTS)
            request = world.enqueue(queue, account, txn=not orphan)
            world.finish(request, "PROCESSING")
            status = rng.choices(["COMPLETED", "FAILED", "CANCELLED", "PENDING"], [6, 1, 1, 1])[0]
            world.finish(request, status)
            settled[request.uuid] = (queue, account, status)
            time.sleep(0.005)
        terminal = {u: v for u, v in settled.items() if v[2] != "PENDING"}
        orphans = {u for u, v in terminal.items() if v[1] == ORPHAN}

        def caught_up() -> bool:
            return world.applied() == len(terminal) - len(orphans) and len(world.parked()) == len(orphans)

        wait_until(caught_up, 30, "every terminal entry to be applied or parked")
        # No PROMETHEUS_MULTIPROC_DIR: the three workers share a directory gunicorn made for the run.
        completed = sum(1 for _, account, status in terminal.values() if status == "COMPLETED" and account != ORPHAN)
        wait_until(lambda: counted(scrape(port)[1], "COMPLETED") == completed, 15, "the metrics to count them")
        assert counted(scrape(port)[1], "parked") >= len(orphans)  # each cycle's retry parks them again
        status_code, parked = call(port, "GET", "/api/v1/consistency/parked?limit=1000")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0

    assert list(temporary.glob("consistency-metrics-*")) == []  # removed by the master on exit
    assert status_code == 200
    assert {e["uuid"] for e in parked["entries"]} == orphans
    mirrored = {"COMPLETED": "PROCESSED", "FAILED": "FAILED", "CANCELLED": "CANCELLED", "PENDING": "PENDING"}
    for entry_uuid, (_, account, status) in settled.items():
        if account != ORPHAN:
            assert world.txn_status(entry_uuid) == mirrored[status], entry_uuid
    for account in ACCOUNTS:
        invests = sum(1 for q, a, s in terminal.values() if (q, a, s) == ("investment", account, "COMPLETED"))
        withdraws = sum(1 for q, a, s in terminal.values() if (q, a, s) == ("withdrawal", account, "COMPLETED"))
        got = world.amounts(account)
        for tier, pool, market, value, allocation in TIERS:
            withdraw_num = str(2 * int(pool) - int(market))
            assert got[f"tier{tier}_value"] == expected(value, *[(market, pool)] * invests), (account, tier)
            assert got[f"tier{tier}_allocation"] == expected(allocation, *[(withdraw_num, pool)] * withdraws)
        assert got["total_value"] == got["tier1_value"] + got["tier2_value"] + got["tier3_value"]
        assert got["total_allocation"] == got["tier1_allocation"] + got["tier2_allocation"] + got["tier3_allocation"]


def counted(samples: Samples, outcome: str) -> float:
    """Return consistency_entries_total for an outcome, both queues together."""
    total = "consistency_entries_total"
    return sum(v for (name, labels), v in samples.items() if name == total and ("outcome", outcome) in labels)


def scrape(port: int) -> tuple[dict[str, str], Samples]:
    """GET /metrics from whichever worker takes the connection, parsed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as answer:
        return parse(answer.read().decode())


def test_gunicorn_workers_share_their_metrics_and_log_only_json(service_env, world: World, tmp_path) -> None:
    world.portfolio_for(ACCOUNTS[0])
    for _ in range(5):
        world.request("investment", ACCOUNTS[0])
    world.request("withdrawal", ACCOUNTS[0], "FAILED")
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"left over from an earlier run")  # unreadable: must be cleared
    service_env.update(PROMETHEUS_MULTIPROC_DIR=str(shared), LOG_FORMAT="json")
    port = int(service_env["PORT"])
    command = gunicorn.command()  # gunicorn.conf.py: 2 workers
    log = tmp_path / "gunicorn.log"
    with running(command, service_env, log) as process:
        wait_until(lambda: call(port, "GET", "/ready")[0] == 200, 30, "readiness")
        completed = ("consistency_entries_total", frozenset({("queue", "investment"), ("outcome", "COMPLETED")}))
        wait_until(lambda: scrape(port)[1][completed] == 5, 30, "the start-up cycle to be counted")
        scrapes = [scrape(port) for _ in range(12)]  # each on a new connection, served by either worker
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0

    writers = {path.stem.rsplit("_", 1)[-1] for path in shared.glob("*.db")}
    assert len(writers) >= 2  # both workers keep their metrics in the shared directory
    failed = ("consistency_entries_total", frozenset({("queue", "withdrawal"), ("outcome", "FAILED")}))
    for types, samples in scrapes:
        assert {name: types.get(name) for name in FAMILIES} == FAMILIES
        assert (samples[completed], samples[failed]) == (5, 1)
        assert samples[("consistency_cycles_total", frozenset({("result", "ok")}))] >= 1
        assert samples[("consistency_last_success_timestamp_seconds", frozenset())] > 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    loggers = {line["logger"] for line in lines}
    assert {"gunicorn.error", "gunicorn.access", "cycle"} <= loggers
    assert any(line.get("event") == "cycle" and line["result"] == "ok" for line in lines)


def test_python_entry_point_serves_the_api_and_stops_on_sigterm(service_env, world: World, tmp_path) -> None:
    world.portfolio_for(ACCOUNTS[0])
    before_start = world.request("withdrawal", ACCOUNTS[0], "FAILED")
    port = int(service_env["PORT"])
    service_env["POLLING_INTERVAL"] = "3600"  # only the start-up cycle and the trigger run
    service_env["LISTEN_NOTIFY"] = "false"  # the listener's first connection would run a cycle of its own
    with running([sys.executable, "consistency_manager_svc.py"], service_env, tmp_path / "python.log") as process:
        wait_until(lambda: world.txn_status(before_start.uuid) == "FAILED", 30, "the start-up cycle")
        wait_until(lambda: call(port, "GET", "/ready")[0] == 200, 30, "readiness")
        assert call(port, "GET", "/health") == (200, {"status": "ok", "poller": "running"})
        request = world.request("investment", ACCOUNTS[0])

        code, summary = call(port, "POST", "/api/v1/consistency/trigger")

        assert code == 200, summary
        assert summary["counts"]["investment"]["COMPLETED"] == 1
        assert world.txn_status(request.uuid) == "PROCESSED"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "consistency_manager_svc.py"], gunicorn.command()],
)
def test_bad_configuration_stops_the_start_naming_every_variable(command) -> None:
    env = {**os.environ, "POLLING_INTERVAL": "soon", "PORT": "0", "QUEUE_DB_URI": "mysql://u:pw@h/db"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "POLLING_INTERVAL must be a number" in result.stderr
    assert "PORT must be a whole number from 1 to 65535" in result.stderr
    assert "QUEUE_DB_URI must be a postgresql:// URI (got a value that is not shown)" in result.stderr
    assert "pw" not in result.stderr


def test_gunicorn_waits_for_the_poller_to_finish_its_batch_within_the_deployments_grace_period() -> None:
    import runpy

    from poller import STOP_TIMEOUT

    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert conf["preload_app"] is False
    assert STOP_TIMEOUT < conf["graceful_timeout"] < termination_grace_period()  # k8s/base/deployment.yaml
    assert STOP_TIMEOUT + conf["graceful_timeout"] <= termination_grace_period()
