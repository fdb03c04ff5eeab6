"""API fuzzing: schemathesis, with the token, against the running service; no 5xx, answers match the document."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.faults.conftest import Stage
from tests.faults.harness import API_TOKEN, open_portfolios
from tests.world import World

ACCOUNTS = ["5000000001", "5000000002"]


def test_schemathesis_finds_no_server_error_and_no_mismatch_with_the_document(stage: Stage, world: World) -> None:
    open_portfolios(world, ACCOUNTS)
    for status in ("COMPLETED", "FAILED"):
        world.request("investment", ACCOUNTS[0], status)
    world.request("withdrawal", "5000000009", "COMPLETED", txn=False)  # a parked entry to list
    replica = stage.replica(workers=2)
    replica.wait_ready()
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
        "run", f"http://127.0.0.1:{replica.port}/api/v1/openapi.json",
        "--header", f"Authorization: Bearer {API_TOKEN}",
        # Every check but positive_data_acceptance: JSON Schema cannot say "a numeric string greater than 0
        # with at most 8 decimals", so some schema-valid tier values are rightly refused with a 400.
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        # One worker: hypothesis describes lambdas with ast.parse, which CPython 3.11 cannot run in two threads
        # at once ("AST constructor recursion depth mismatch", a SystemError seen here).
        "--max-examples", "40", "--seed", "1", "--workers", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    print(result.stdout[-5000:])
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) > 100
    assert API_TOKEN not in stage.log_text()
