"""Stops mid-drain, whatever the signal and whoever gets it: each process ends its cycle at a batch boundary.

It gives the cycle lease back and exits well within gunicorn's graceful_timeout; a new replica then catches up.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devkit import gunicorn, roles
from devkit.net import wait_until
from tests.faults.conftest import Stage, record
from tests.faults.harness import (
    Replica,
    bulk_backlog,
    check_model,
    open_portfolios,
    service_env,
    settled_in_queues,
    wait_caught_up,
)
from tests.world import World

ACCOUNTS = [f"42000{n:05d}" for n in range(200)]  # ~50 completions each: no tier value overflows
BACKLOG = 30000
STOP_WITHIN = 10.0  # seconds; gunicorn's graceful_timeout is 20


def group_members(pgid: int) -> set[int]:
    """Return the pids of the processes of a process group that have not exited (zombies excluded)."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.add(int(entry.name))
    return members


def draining(stage: Stage, world: World, flask: bool = False) -> Replica:
    """Start a replica (gunicorn, or Flask's server) on a large backlog; return it once its drain is under way."""
    open_portfolios(world, ACCOUNTS)
    bulk_backlog(world, ACCOUNTS, BACKLOG)
    if flask:
        uris = [roles.with_user(uri, stage.role) for uri in stage.dbs]
        replica = Replica(service_env(*uris, BATCH_SIZE="200"), stage.logs / "flask.log", workers=0)
        entry_point = [sys.executable, "consistency_manager_svc.py"]
        replica.process = gunicorn.start(entry_point, replica.env, replica.log, own_group=True)
        stage.replicas.append(replica)
    else:
        replica = stage.replica(workers=2, BATCH_SIZE="200")
    wait_until(lambda: world.applied() > 1000, 30, "the drain to be under way")
    return replica


def stop(replica: Replica, send: Callable[[int], None]) -> float:
    """Signal the replica (`send` gets its group's id, the master's pid); return the seconds until all exited."""
    assert replica.process is not None
    master = replica.process
    assert len(group_members(master.pid)) == 1 + replica.workers  # the master and its workers, running
    started = time.monotonic()
    send(master.pid)

    def gone() -> bool:
        master.poll()  # reap the master
        return not group_members(master.pid)

    wait_until(gone, 2 * STOP_WITHIN, "every process of the replica to exit", interval=0.05)
    return time.monotonic() - started


def assert_handed_over(stage: Stage, world: World, stopped: Replica, scenario: str, took: float) -> None:
    """Check a stop handed over: the lease given back, every worker through worker_exit, none killed, in time.

    The drain must have stopped mid-backlog; a new replica then catches up, and the model check finds nothing.
    """
    applied_at_stop = world.applied()
    assert world.p("SELECT holder FROM consistency.cycle_lease") == [(None,)]  # given back, not merely expired
    log = stopped.log.read_text()
    assert "SIGKILL" not in log
    assert log.count("Worker exiting") == stopped.workers  # a second signal did not cut gunicorn's teardown short
    assert took < STOP_WITHIN
    assert applied_at_stop < settled_in_queues(world)  # it stopped mid-backlog
    stage.replica(workers=2).wait_ready()
    wait_caught_up(world)
    report = check_model(world)
    record(scenario, report, stop_s=round(took, 2), applied_at_stop=applied_at_stop)
    assert report.mismatches == [], report.mismatches[:20]
    assert report.completed > 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_group_mid_drain_hands_over(stage: Stage, world: World, sig: signal.Signals) -> None:
    replica = draining(stage, world)
    took = stop(replica, lambda group: os.killpg(group, sig))  # Ctrl-C at a terminal, or a supervisor
    assert_handed_over(stage, world, replica, f"{sig.name} to the group", took)


def test_sigint_to_the_master_alone_mid_drain_hands_over(stage: Stage, world: World) -> None:
    replica = draining(stage, world)
    took = stop(replica, lambda master: os.kill(master, signal.SIGINT))  # quick shutdown: the workers get SIGQUIT
    assert_handed_over(stage, world, replica, "SIGINT to the master", took)


def test_ctrl_c_stops_the_flask_entry_point_mid_drain_the_same_way(stage: Stage, world: World) -> None:
    replica = draining(stage, world, flask=True)
    took = stop(replica, lambda group: os.killpg(group, signal.SIGINT))
    assert_handed_over(stage, world, replica, "SIGINT to the Flask entry point", took)
