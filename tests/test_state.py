"""The service's own state: migrations, stored tier values with history, and start-up checks."""

from __future__ import annotations

import logging
import threading
from decimal import Decimal

import migrations
import tiers
from tests.world import World


def test_migration_is_idempotent_and_safe_when_processes_start_together(make_service, world: World) -> None:
    world.p("DROP SCHEMA consistency CASCADE")
    services = [make_service() for _ in range(4)]
    start = threading.Barrier(len(services))
    errors: list[BaseException] = []

    def boot(svc) -> None:
        start.wait()
        try:
            svc.runner.prepare()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=boot, args=(s,)) for s in services]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert world.p("SELECT version FROM consistency.schema_migrations") == [
        (version,) for version, _, _ in migrations.available_migrations()
    ]
    assert world.p("SELECT count(*) FROM consistency.tier_values") == [(3,)]
    assert world.p("SELECT count(*) FROM consistency.tier_value_history") == [(3,)]
    # Running it again changes nothing.
    with services[0].portfolio_db.transaction() as cur:
        assert migrations.migrate(cur) == []


def test_configured_tier_values_seed_the_store_only_the_first_time(make_service, world: World) -> None:
    world.p("DELETE FROM consistency.tier_values")
    first = make_service(tier_seed=((Decimal("10"), Decimal("11")),) * 3)
    first.runner.prepare()
    second = make_service(tier_seed=((Decimal("20"), Decimal("22")),) * 3)
    second.runner.prepare()

    assert world.p("SELECT pool, market FROM consistency.tier_values WHERE tier = 1") == [
        (Decimal("10"), Decimal("11"))
    ]


def test_a_tier_update_survives_a_restart_and_keeps_a_history(make_service, world: World) -> None:
    first = make_service()
    first.runner.prepare()
    first.update_tiers({"TIER2_MV": Decimal("2100000.5")}, "test", None)
    first.close()

    second = make_service()
    second.runner.prepare()
    with second.portfolio_db.transaction() as cur:
        current = tiers.load(cur)

    assert current[1].market == Decimal("2100000.5")
    assert current[1].pool == Decimal("2000000")
    history = world.p(
        "SELECT tier, old_pool, new_pool, old_market, new_market FROM consistency.tier_value_history"
        " WHERE old_market IS NOT NULL"
    )
    assert history == [(2, Decimal("2000000"), Decimal("2000000"), Decimal("2000000"), Decimal("2100000.5"))]


def test_start_up_warns_when_the_watermark_index_is_missing(make_service, world: World, caplog) -> None:
    world.q("DROP INDEX withdrawal_queue_updated_at_queue_id")
    caplog.set_level(logging.WARNING)

    make_service().runner.prepare()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("withdrawal_queue has no index on (updated_at, queue_id)" in w for w in warnings)
    assert not any("investment_queue has no index" in w for w in warnings)


def test_deltas_follow_the_seed_formula() -> None:
    tier = tiers.Tier(pool=Decimal("2000000"), market=Decimal("1900000"))
    assert tier.delta == Decimal("-0.05")
    assert tier.invest_factor == Decimal("0.95")
    assert tier.withdraw_factor == Decimal("1.05")
    assert tiers.shown_delta(tiers.Tier(Decimal("3"), Decimal("4"))) == "0.333333333333"


def test_the_status_answers_from_the_stored_state_when_queue_db_does_not(make_service, mocker) -> None:
    import service

    svc = make_service(queue_db_uri="postgresql://svc:pw-in-the-uri@127.0.0.1:1/queue-db")
    probes = mocker.spy(svc.queue_db, "connection")
    mocker.patch.object(service, "STATE_MAX_AGE", 60.0)  # however slow this machine, the kept state is young

    status = svc.status()
    again = svc.status()

    assert status["tiers"]["TIER1"] == "1000000" and status["applying"] == "running"
    assert status["backlog"]["lag_s"] is None and status["backlog"]["queues"] == {}
    assert status["backlog"]["error"].startswith("queue-db: ") and "pw-in-the-uri" not in status["backlog"]["error"]
    assert again["backlog"] == status["backlog"]
    assert probes.call_count == 1  # asked again only once the kept state is older than STATE_MAX_AGE, as it is
