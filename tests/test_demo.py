"""The demo works on a machine with no PostgreSQL, and shows a person text lines without a flood of idle cycles."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import demo
from devkit import ROOT, gunicorn
from devkit.net import free_port, wait_until

DEMO = [sys.executable, "demo.py"]
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104 - what DEMO_HOST may ask for


def demo_env(**settings: str) -> dict[str, str]:
    """The environment of `make demo` on a machine with no PostgreSQL, on a free port, in the demo's log format."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOG_FORMAT", "POLLING_INTERVAL", "DEMO_HOST")}
    return {**env, "DEMO_PG_URI": "embedded", "PORT": str(free_port()), "PYTHONUNBUFFERED": "1", **settings}


def listening_on(port: int) -> set[str]:
    """Return the local addresses of the TCP sockets that listen on a port, as /proc/net/tcp and tcp6 list them."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            host, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(host)  # in 32-bit words of this machine's byte order (little-endian)
                found.add(str(ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))))
    return found


def cycle_lines(output: str) -> list[str]:
    """Return the summary lines of the cycles that ran, as the text format writes them."""
    return [line for line in output.splitlines() if " INFO cycle: consistency cycle ok" in line]


def test_demo_applies_its_sample_with_an_embedded_postgresql() -> None:
    result = subprocess.run([*DEMO, "--smoke"], cwd=ROOT, env=demo_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "starting an embedded PostgreSQL" in result.stdout
    assert "demo smoke check passed" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("{")]  # text lines, not JSON
    assert "COMPLETED=2 FAILED=1" in cycle_lines(result.stdout)[0]  # the start-up cycle applied the sample


def test_demo_shows_the_cycles_that_did_something_and_not_the_idle_ones(tmp_path) -> None:
    log = tmp_path / "demo.log"
    demo = gunicorn.start(DEMO, demo_env(POLLING_INTERVAL="0.1"), log)
    try:
        wait_until(lambda: "Ctrl-C stops it all" in log.read_text(), 120, "the demo to start")
        # Some 30 cycles, none with anything new: the demo queues its next request after NEW_REQUEST_EVERY.
        time.sleep(3)
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops the service and the embedded server
        code = demo.wait(timeout=60)
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert "COMPLETED=2 FAILED=1" in cycle_lines(output)[0]
    # After the start and what the demo staged for the console, the idle cycles show nothing; at most the other
    # worker's first cycle, which parks the orphan again.
    idle = cycle_lines(output.split("Ctrl-C stops it all", 1)[1])
    assert len(idle) <= 1, "\n".join(idle)
    assert '"GET /' not in output  # no access log: the demo's commands stay readable


def test_the_demo_says_where_to_go_and_gives_every_console_page_something(tmp_path) -> None:
    env, log = demo_env(POLLING_INTERVAL="0.5"), tmp_path / "demo.log"
    process = gunicorn.start(DEMO, env, log)
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_until(lambda: "Ctrl-C stops it all" in log.read_text(), 120, "the demo to start")
        # The demo's own trigger may find the turn taken by a polling cycle (every 0.5 s here): the correction is
        # then counted by the next cycle, and /status shows it within its second of keeping the state. Each worker
        # keeps its own read, so another worker may still show 0 a moment later: the answer that counted it is kept.
        status = "/api/v1/consistency/status"
        answers: list[dict] = []

        def counted() -> bool:
            """Ask for the status, keep the answer and tell whether it counts the demo's correction."""
            answers.append(demo.request_json(base, "GET", status)[1])
            return answers[-1].get("corrections") == 1

        wait_until(counted, 20, "the demo's correction to be counted")
        asked = {status: answers[-1]} | {path: demo.request_json(base, "GET", path)[1] for path in (
            "/api/v1/consistency/corrections", "/api/v1/consistency/parked", "/api/v1/consistency/audit",
        )}  # fmt: skip
        wait_until(lambda: demo.request_json(base, "GET", "/api/v1/consistency/drift-checks/latest")[1].get("state")
                   == "done", 30, "the demo's drift check")  # fmt: skip
        drift = demo.request_json(base, "GET", "/api/v1/consistency/drift-checks/latest")[1]
        wait_until(lambda: "is COMPLETED" in log.read_text().split("Ctrl-C stops it all", 1)[1], 20, "a new request")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    output = log.read_text()
    assert f"The console: {base}/console/" in output
    assert f"export API_TOKEN={demo.DEMO_TOKEN}" in output
    assert "demo: PostgreSQL embedded" in output and "as DEMO_PG_URI says" in output
    assert asked[status]["corrections"] == 1 and asked["/api/v1/consistency/corrections"]["count"] == 1
    assert len(asked["/api/v1/consistency/parked"]["entries"]) >= 1
    assert {"pause", "resume", "start_drift_check"} <= {
        r["action"] for r in asked["/api/v1/consistency/audit"]["entries"]
    }
    assert drift["counts"]["unrecorded_transaction"] == 1 and drift["findings"]


def test_the_demo_listens_on_this_machine_only_by_default(tmp_path) -> None:
    env, log = demo_env(), tmp_path / "demo.log"
    port = int(env["PORT"])
    process = gunicorn.start(DEMO, env, log)
    try:
        wait_until(lambda: "Ctrl-C stops it all" in log.read_text(), 120, "the demo to start")
        listening = listening_on(port)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert listening == {"127.0.0.1"}  # its token is printed for anyone to read: not on 0.0.0.0
    assert f"running on http://127.0.0.1:{port}." in log.read_text()


def test_the_demo_reaches_a_server_told_to_listen_on_every_interface_through_the_loopback() -> None:
    assert demo.address(EVERY_INTERFACE, 8080) == "0.0.0.0:8080"
    assert demo.base_url(EVERY_INTERFACE, 8080) == "http://127.0.0.1:8080"
    assert demo.address("::", 8080) == "[::]:8080"
    assert demo.base_url("::", 8080) == "http://[::1]:8080"
    assert demo.base_url("192.0.2.7", 8080) == "http://192.0.2.7:8080"
