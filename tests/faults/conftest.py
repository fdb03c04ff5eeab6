"""Fixtures of the fault-injection suite: least-privilege roles, replicas, and the figures each scenario reports."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from devkit import roles
from tests.faults.harness import Replica, Report, service_env
from tests.world import World

FIGURES: list[str] = []


@dataclass
class Stage:
    """A scenario's stage: the databases, the service's role, and the replicas it started."""

    pg: str
    dbs: tuple[str, str]
    role: str
    world: World
    logs: Path
    replicas: list[Replica] = field(default_factory=list)

    def grant(self, read_all_stats: bool) -> None:
        """Give the role exactly schema/grants.sql; the service then creates its state in its own schema."""
        self.world.p("DROP SCHEMA consistency CASCADE")
        names = [urlsplit(uri).path.lstrip("/") for uri in self.dbs]
        roles.apply_grants(self.pg, self.role, *names, read_all_stats=read_all_stats)

    def replica(self, workers: int = 2, **env: str) -> Replica:
        """Start one more replica of the service, as the role."""
        uris = [roles.with_user(uri, self.role) for uri in self.dbs]
        replica = Replica(service_env(*uris, **env), self.logs / f"replica-{len(self.replicas)}.log", workers)
        self.replicas.append(replica.start())
        return replica

    def log_text(self) -> str:
        """Everything the replicas logged."""
        return "".join(path.read_text() for path in sorted(self.logs.glob("*.log")))


def _stage(pg: str, dbs: tuple[str, str], role: str, world: World, tmp_path: Path, read_all_stats: bool) -> Iterator:
    """Build a stage and tear down its replicas afterwards, showing their logs on failure."""
    stage = Stage(pg, dbs, role, world, tmp_path)
    stage.grant(read_all_stats)
    yield stage
    for replica in stage.replicas:
        replica.cleanup()
    print(stage.log_text()[-6000:])


@pytest.fixture
def stage(pg, dbs, exact_role, world, tmp_path) -> Iterator[Stage]:
    """A stage whose service runs as a least-privilege role with pg_read_all_stats (exact mode)."""
    yield from _stage(pg, dbs, exact_role, world, tmp_path, read_all_stats=True)


@pytest.fixture
def lookback_stage(pg, dbs, lookback_role, world, tmp_path) -> Iterator[Stage]:
    """A stage whose service runs with schema/grants.sql only (look-back mode)."""
    yield from _stage(pg, dbs, lookback_role, world, tmp_path, read_all_stats=False)


def record(scenario: str, report: Report, **figures: object) -> None:
    """Keep a scenario's figures for the summary at the end of the run."""
    extra = " ".join(f"{k}={v}" for k, v in figures.items())
    FIGURES.append(
        f"{scenario}: {extra} entries_checked={report.entries} settled={report.settled} completed={report.completed} "
        f"accounts={report.accounts} tier_versions={report.tier_versions} mismatches={len(report.mismatches)}"
    )


def pytest_terminal_summary(terminalreporter) -> None:
    """Print every scenario's figures after the run."""
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
