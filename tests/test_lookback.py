"""Least privilege: without xact_start visibility the look-back window and reconciliation lose nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlsplit

import pytest

from service import build_service
from tests import pgtest
from tests.world import World, expected

ACCOUNT = "1000000001"


@pytest.fixture
def limited_service(pg, dbs, settings, lookback_role, world: World) -> Iterator:
    """The service running as the limited role, with a 1 s look-back and a 3 s reconciliation interval."""
    names = [urlsplit(uri).path.lstrip("/") for uri in dbs]
    world.p("DROP SCHEMA consistency CASCADE")  # the service creates its own schema as the limited role
    pgtest.apply_grants(pg, lookback_role, *names)
    svc = build_service(
        replace(
            settings,
            queue_db_uri=pgtest.with_user(dbs[0], lookback_role),
            portfolio_db_uri=pgtest.with_user(dbs[1], lookback_role),
            lookback_window=1.0,
            reconcile_interval=3.0,
        )
    )
    svc.runner.prepare()
    yield svc
    svc.close()


def test_a_late_commit_older_than_the_lookback_is_found_by_reconciliation(limited_service, world: World, caplog):
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
        assert first["reconciled"] is True
        assert first["counts"]["investment"]["COMPLETED"] == 1
        time.sleep(1.3)  # the writer now holds its transaction longer than the look-back window
        world.request("investment", ACCOUNT)
        second = svc.runner.run().to_json()
        assert second["counts"]["investment"]["COMPLETED"] == 1
        watermark = world.p("SELECT updated_at FROM consistency.watermarks WHERE queue = 'investment'")[0][0]
        assert watermark > writer.updated_at  # the look-back alone has moved past the late entry
    finally:
        writer.commit()

    missed = svc.runner.run().to_json()
    assert missed["reconciled"] is False
    assert world.txn_status(late.uuid) == "PENDING"

    time.sleep(max(0.0, 3.1 - (time.monotonic() - svc.runner.watch._last_reconcile)))
    swept = svc.runner.run().to_json()

    assert swept["reconciled"] is True
    assert swept["counts"]["investment"]["reconciled"] == 1
    assert world.txn_status(late.uuid) == "PROCESSED"
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", *[("1100000", "1000000")] * 3)
    assert world.applied() == 3
    assert svc.status()["mode"] == "lookback"
