"""Least privilege: without xact_start visibility the look-back window and reconciliation lose nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from devkit import roles
from queue_pass import QueuePass
from service import Service, build_service
from tests.world import World, expected

ACCOUNT = "1000000001"


@pytest.fixture
def limited_service(pg, dbs, settings, lookback_role, world: World) -> Iterator:
    """The service running as the limited role, with a 3 s look-back and a 3 s reconciliation interval."""
    svc = build_limited(pg, dbs, settings, lookback_role, world)
    yield svc
    svc.close()


def build_limited(pg, dbs, settings, lookback_role, world: World, **overrides: object) -> Service:
    """Build and prepare the service as the limited role, with a 3 s look-back and reconciliation interval."""
    names = [urlsplit(uri).path.lstrip("/") for uri in dbs]
    world.p("DROP SCHEMA consistency CASCADE")  # the service creates its own schema as the limited role
    roles.apply_grants(pg, lookback_role, *names)
    svc = build_service(
        replace(
            settings,
            queue_db_uri=roles.with_user(dbs[0], lookback_role),
            portfolio_db_uri=roles.with_user(dbs[1], lookback_role),
            lookback_window=3.0,
            reconcile_interval=3.0,
            **overrides,
        )
    )
    svc.runner.prepare()
    return svc


def test_a_late_commit_behind_the_read_position_is_found_by_the_sweep_and_idle_cycles_read_nothing_again(
    limited_service, world: World, caplog
):
    svc = limited_service
    world.portfolio_for(ACCOUNT)
    world.set_tiers(TIER1_MV="1100000")
    late = world.enqueue("investment", ACCOUNT)
    writer = world.finish_uncommitted(late)
    try:
        world.request("investment", ACCOUNT)
        first = svc.runner.run().to_json()
        assert first["mode"] == "lookback"
        assert any(r.getMessage().startswith("watermark mode: lookback") for r in caplog.records)
        assert first["reconciled"] is True  # the first sweep is due at once
        assert first["counts"]["investment"]["COMPLETED"] == 1
        time.sleep(1.3)  # the writer holds its transaction past the drain's reading, within the 3 s bound
        world.request("investment", ACCOUNT)
        second = svc.runner.run().to_json()
        assert second["counts"]["investment"]["COMPLETED"] == 1
        assert second["counts"]["investment"]["read"] == 1  # from the read position, not the whole window
        watermark = world.p("SELECT updated_at FROM consistency.watermarks WHERE queue = 'investment'")[0][0]
        assert watermark < writer.updated_at  # only a sweep moves it, and never past a commit the bound allows
    finally:
        writer.commit()

    missed = svc.runner.run().to_json()
    assert missed["reconciled"] is False
    assert missed["counts"]["investment"]["read"] == 0  # an idle cycle reads nothing again
    assert world.txn_status(late.uuid) == "PENDING"  # behind the read position: the drain does not see it

    time.sleep(3.1)  # RECONCILE_INTERVAL, by user-portfolio-db's clock
    swept = svc.runner.run().to_json()

    assert swept["reconciled"] is True
    assert swept["counts"]["investment"]["reconciled"] == 1
    assert world.txn_status(late.uuid) == "PROCESSED"
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", *[("1100000", "1000000")] * 3)
    assert world.applied() == 3
    assert svc.status()["mode"] == "lookback"


def test_a_long_sweep_goes_in_slices_between_drains_and_holds_no_new_entry_back(
    pg, dbs, settings, lookback_role, world: World, monkeypatch
) -> None:
    svc = build_limited(pg, dbs, settings, lookback_role, world, batch_size=10)
    try:
        world.portfolio_for(ACCOUNT)
        for _ in range(60):  # the first cycle's sweep pages through all of them, 10 at a time
            world.request("investment", ACCOUNT)
        sweep_page = QueuePass._sweep_page
        seen: list[bool] = []  # at each sweep page after the first: whether the new entry is applied yet
        new: list[str] = []

        def watched(self, *args):
            if self.queue.name == "investment":
                if not new:  # two arrive while the sweep runs: one in each queue
                    new.extend(world.request(queue, ACCOUNT).uuid for queue in ("withdrawal", "investment"))
                else:
                    seen.append(all(world.txn_status(uuid) == "PROCESSED" for uuid in new))
            return sweep_page(self, *args)

        monkeypatch.setattr(QueuePass, "_sweep_page", watched)
        result = svc.runner.run().to_json()
    finally:
        svc.close()
    assert result["reconciled"] is True and result["counts"]["investment"]["swept"] == 60
    assert len(seen) >= 5 and seen[0] is True  # applied after the sweep's first page, before its second
    assert world.applied() == 62
