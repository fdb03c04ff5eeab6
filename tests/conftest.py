"""Fixtures: a PostgreSQL server, fresh databases per test, the service, the app and its client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

import migrations
import tiers
from config import Settings
from devkit import ROOT, postgres, roles
from service import Service, build_service
from tests.world import World

API_TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="session")
def pg() -> Iterator[str]:
    """The URI of the server the tests use."""
    uri, keep_alive = postgres.server_uri()
    yield uri
    del keep_alive


@pytest.fixture(scope="session")
def templates(pg: str) -> Iterator[tuple[str, str]]:
    """Template databases with the queue-db and user-portfolio-db schemas, the latter migrated, built once."""

    def migrate_and_seed(cur) -> None:
        migrations.migrate(cur)
        tiers.seed(cur, Settings().tier_seed)

    names = (
        postgres.create_template(pg, "cmtpl_queue", ROOT / "schema" / "queue_db.sql"),
        postgres.create_template(pg, "cmtpl_portfolio", ROOT / "schema" / "user_portfolio_db.sql", migrate_and_seed),
    )
    yield names
    for name in names:
        postgres.drop(pg, name)


@pytest.fixture(scope="session")
def exact_role(pg: str) -> Iterator[str]:
    """A login role for schema/grants.sql with pg_read_all_stats: exact watermark mode."""
    with roles.login_role(pg, "cm_exact") as role:
        yield role


@pytest.fixture(scope="session")
def lookback_role(pg: str) -> Iterator[str]:
    """A login role for schema/grants.sql alone: neither superuser nor pg_read_all_stats, so look-back mode."""
    with roles.login_role(pg, "cm_lookback") as role:
        yield role


@pytest.fixture
def dbs(pg: str, templates: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """Fresh queue-db and user-portfolio-db for one test, as URIs."""
    names = [postgres.clone(pg, template) for template in templates]
    yield postgres.with_database(pg, names[0]), postgres.with_database(pg, names[1])
    for name in names:
        postgres.drop(pg, name)


@pytest.fixture
def settings(dbs: tuple[str, str]) -> Settings:
    """Settings aimed at the test's databases, with small batches and a known token."""
    return Settings(
        queue_db_uri=dbs[0],
        portfolio_db_uri=dbs[1],
        polling_interval=0.2,
        api_token=API_TOKEN,
        batch_size=4,
        trigger_wait=2.0,
        db_connect_timeout=3,
    )


@pytest.fixture
def make_service(settings: Settings) -> Iterator:
    """A factory of services on the test's databases (one per simulated process); closes them all."""
    made: list[Service] = []

    def make(**overrides: object) -> Service:
        svc = build_service(replace(settings, **overrides))
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.close()


@pytest.fixture
def svc(make_service) -> Service:
    """The service under test, migrated and seeded, its poller not running."""
    service = make_service()
    service.runner.prepare()
    return service


@pytest.fixture
def world(dbs: tuple[str, str]) -> Iterator[World]:
    """Direct connections to the test's databases."""
    w = World(*dbs)
    yield w
    w.close()


@pytest.fixture
def app(settings: Settings):
    """The Flask app on the test's databases, state prepared, poller not started."""
    from consistency_manager_svc import create_app
    from service import service_of

    flask_app = create_app(settings)
    service_of(flask_app).runner.prepare()
    yield flask_app
    service_of(flask_app).close()


@pytest.fixture
def make_app(settings: Settings) -> Iterator:
    """A factory of apps with some settings changed; closes them all."""
    from consistency_manager_svc import create_app
    from service import service_of

    made = []

    def make(**overrides: object):
        made.append(create_app(replace(settings, **overrides)))
        return made[-1]

    yield make
    for flask_app in made:
        service_of(flask_app).close()


@pytest.fixture
def client(app):
    """A test client of the app."""
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    """Headers that carry the test token."""
    return {"Authorization": f"Bearer {API_TOKEN}"}
