"""The container image without a container engine: the Dockerfile's final stage, run as the image runs it.

The test lays out the files the final stage's COPY instructions take from the build context (after
.dockerignore), then runs the stage's exact CMD there with only the stage's ENV, the database URIs and a
port, the venv of the tests standing in for the image's /opt/venv.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit import ROOT, postgres
from devkit.net import free_port, wait_until
from tests.manifests import DOCKERFILE, ImageStage, assemble_workdir, base_deployment, context_files, final_stage
from tests.manifests import termination_grace_period as grace_period
from tests.test_e2e import call, running

STAGE = final_stage(DOCKERFILE.read_text())
IMAGE_TMP = "/tmp"  # noqa: S108 - the image's temp folder, not one the tests use


@pytest.fixture
def fresh_dbs(pg: str, templates: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """A queue-db, and a user-portfolio-db with the portfolio tables only, so start-up runs the migrations."""
    queue = postgres.clone(pg, templates[0])
    portfolio = postgres.create_template(pg, "cmimg_portfolio", ROOT / "schema" / "user_portfolio_db.sql")
    yield postgres.with_database(pg, queue), postgres.with_database(pg, portfolio)
    for name in (queue, portfolio):
        postgres.drop(pg, name)


def image_env(stage: ImageStage, dbs: tuple[str, str], port: int) -> dict[str, str]:
    """The environment of a `docker run -e QUEUE_DB_URI=... -e USER_PORTFOLIO_DB_URI=...` of the image."""
    venv_bin = str(Path(sys.executable).parent)
    env = {name: value.replace("/opt/venv/bin", venv_bin) for name, value in stage.env.items()}
    env["PATH"] = env.get("PATH", "$PATH").replace("$PATH", os.environ["PATH"])
    env.update(QUEUE_DB_URI=dbs[0], USER_PORTFOLIO_DB_URI=dbs[1], PORT=str(port))
    return env


def test_the_image_command_serves_and_stops_cleanly_on_sigterm(fresh_dbs, tmp_path) -> None:
    workdir = assemble_workdir(STAGE, tmp_path / "image")
    port = free_port()
    with running(STAGE.cmd, image_env(STAGE, fresh_dbs, port), tmp_path / "image.log", cwd=workdir) as process:
        wait_until(lambda: process.poll() is not None or call(port, "GET", "/ready")[0] == 200, 30, "readiness")
        assert process.poll() is None, "the image's command exited"
        ready = {"status": "ready", "checks": {"queue-db": "ok", "user-portfolio-db": "ok"}}
        assert call(port, "GET", "/ready") == (200, ready)
        assert call(port, "GET", "/health") == (200, {"status": "ok", "poller": "running"})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/console/signin", timeout=10) as page:
            assert page.status == 200 and b'name="token"' in page.read()  # the console's templates are shipped
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=grace_period()) == 0
    assert time.monotonic() - started < grace_period()


def test_a_broken_command_is_caught(fresh_dbs, tmp_path) -> None:
    broken = final_stage(DOCKERFILE.read_text().replace("consistency_manager_svc:app", "consistency_manager:app"))
    workdir = assemble_workdir(broken, tmp_path / "image")
    port = free_port()
    with running(broken.cmd, image_env(broken, fresh_dbs, port), tmp_path / "image.log", cwd=workdir) as process:
        assert process.wait(timeout=30) != 0


def test_the_image_holds_what_the_service_reads_and_nothing_of_the_tests(tmp_path) -> None:
    workdir = assemble_workdir(STAGE, tmp_path / "image")
    shipped = {str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file()}
    needed = {"consistency_manager_svc.py", "gunicorn.conf.py", "sql/queries.sql", "sql/migrations/0001_state.sql",
              "static/swagger-init.js", "console/__init__.py", "console/templates/console/base.html",
              "console/static/console.css"}  # fmt: skip
    assert needed <= shipped
    assert not any(name.startswith(("tests/", "bench/", "devkit/", ".venv/", ".git")) for name in shipped)
    assert not any(path.parts[0] in {"tests", "bench", "devkit", "demo.py"} for path in context_files())


def test_the_deployment_runs_the_image_as_its_user_on_its_port_with_a_writable_tmp() -> None:
    pod = base_deployment()["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert STAGE.user.isdigit()
    assert pod["securityContext"]["runAsUser"] == container["securityContext"]["runAsUser"] == int(STAGE.user)
    assert [str(p["containerPort"]) for p in container["ports"]] == STAGE.expose == ["8080"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    # worker_tmp_dir unset: gunicorn's heartbeat files go to the temp folder, which is /tmp in the image.
    assert conf.get("worker_tmp_dir") is None
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[IMAGE_TMP]]
