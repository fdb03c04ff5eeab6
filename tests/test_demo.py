"""The demo works on a machine with no PostgreSQL: it starts an embedded one and applies its sample."""

from __future__ import annotations

import os
import subprocess
import sys

from devkit import ROOT
from devkit.net import free_port


def test_demo_applies_its_sample_with_an_embedded_postgresql() -> None:
    env = {**os.environ, "DEMO_PG_URI": "embedded", "PORT": str(free_port())}
    result = subprocess.run(
        [sys.executable, "demo.py", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "starting an embedded PostgreSQL" in result.stdout
    assert "demo smoke check passed" in result.stdout
