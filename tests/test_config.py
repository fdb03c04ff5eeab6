"""Configuration: the seed's defaults, and a clear stop naming every bad variable."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config import ConfigError, load_settings


def problems(**environ: str) -> list[str]:
    """Return the problems load_settings reports for an environment."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return caught.value.problems


def test_defaults_are_the_seeds() -> None:
    settings = load_settings({})
    assert settings.polling_interval == 30.0
    assert settings.port == 8080
    assert settings.tier_seed == (
        (Decimal("1000000.0"), Decimal("1000000.0")),
        (Decimal("2000000.0"), Decimal("2000000.0")),
        (Decimal("500000.0"), Decimal("500000.0")),
    )
    assert settings.queue_db_uri == "postgresql://queue-admin:queue-pwd@localhost:5432/queue-db"
    assert settings.portfolio_db_uri == ("postgresql://portfolio-admin:portfolio-pwd@localhost:5432/user-portfolio-db")
    assert settings.api_token is None


def test_values_are_read_and_parsed() -> None:
    settings = load_settings(
        {
            "POLLING_INTERVAL": "0.5",
            "PORT": "9090",
            "TIER2_MV": "1999999.12345678",
            "API_TOKEN": "a-token-of-sixteen+",
            "BATCH_SIZE": "250",
            "LOG_LEVEL": "debug",
            "QUEUE_DB_URI": "postgres://u@db/q",
        }
    )
    assert settings.polling_interval == 0.5
    assert settings.port == 9090
    assert settings.tier_seed[1] == (Decimal("2000000.0"), Decimal("1999999.12345678"))
    assert settings.api_token == "a-token-of-sixteen+"
    assert settings.batch_size == 250
    assert settings.log_level == "DEBUG"
    assert settings.queue_db_uri == "postgres://u@db/q"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("POLLING_INTERVAL", "soon", "POLLING_INTERVAL must be a number from 0.05 to 86400 (got 'soon')"),
        ("POLLING_INTERVAL", "0", "POLLING_INTERVAL must be a number from 0.05 to 86400 (got '0')"),
        ("POLLING_INTERVAL", "nan", "POLLING_INTERVAL must be a number from 0.05 to 86400 (got 'nan')"),
        ("PORT", "80.5", "PORT must be a whole number from 1 to 65535 (got '80.5')"),
        ("PORT", "70000", "PORT must be a whole number from 1 to 65535 (got '70000')"),
        ("TIER1", "0", "TIER1 must be greater than 0"),
        ("TIER2", "abc", "TIER2 must be a decimal number (got 'abc')"),
        ("TIER3_MV", "-1", "TIER3_MV must be 0 or more"),
        ("TIER1_MV", "Infinity", "TIER1_MV must be a decimal number (got 'Infinity')"),
        ("TIER1", "0.123456789", "TIER1 must have at most 8 decimal places"),
        ("TIER1", "1e12", "TIER1 must be less than 1000000000000"),
        ("BATCH_SIZE", "0", "BATCH_SIZE must be a whole number from 1 to 100000 (got '0')"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR (got 'LOUD')"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be one of json, text (got 'xml')"),
        (
            "PROMETHEUS_MULTIPROC_DIR",
            "/no/such/dir",
            "PROMETHEUS_MULTIPROC_DIR must be an existing directory (got '/no/such/dir')",
        ),
        ("DB_POOL_SIZE", "1", "DB_POOL_SIZE must be a whole number from 2 to 100 (got '1')"),
        ("API_TOKEN", "short", "API_TOKEN must be at least 16 characters"),
        ("LISTEN_NOTIFY", "maybe", "LISTEN_NOTIFY must be true or false (got 'maybe')"),
    ],
)
def test_each_bad_value_is_named(name: str, value: str, message: str) -> None:
    assert problems(**{name: value}) == [message]


def test_every_problem_is_reported_at_once_and_credentials_are_not_echoed() -> None:
    found = problems(
        QUEUE_DB_URI="mysql://user:hunter2@db/q",
        USER_PORTFOLIO_DB_URI="nonsense-with-secret",
        RECONCILE_INTERVAL="-5",
        TRIGGER_WAIT="forever",
    )
    assert [p.split(" ")[0] for p in found] == [
        "QUEUE_DB_URI",
        "USER_PORTFOLIO_DB_URI",
        "RECONCILE_INTERVAL",
        "TRIGGER_WAIT",
    ]
    assert "hunter2" not in " ".join(found)
    assert "secret" not in " ".join(found)


def test_the_tokens_file_is_read_at_start_and_its_path_kept_for_reading_again(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice alice-token-0123456789 operate\n")
    settings = load_settings({"API_TOKENS_FILE": f" {path} "})
    assert settings.api_tokens_file == str(path)
    assert [(c.name, c.role) for c in settings.api_tokens] == [("alice", "operate")]
    assert load_settings({}).api_tokens_file is None


def test_blank_values_mean_the_default() -> None:
    assert load_settings({"POLLING_INTERVAL": " ", "PORT": ""}).port == 8080


def test_logs_are_json_unless_text_is_asked_for() -> None:
    assert load_settings({}).log_format == "json"
    assert load_settings({"LOG_FORMAT": "Text"}).log_format == "text"
    assert load_settings({"LOG_FORMAT": "json"}).log_format == "json"


def test_metrics_are_per_process_unless_a_shared_directory_is_named(tmp_path) -> None:
    assert load_settings({}).metrics_dir is None
    assert load_settings({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}).metrics_dir == str(tmp_path)


@pytest.mark.parametrize(
    ("value", "listen"),
    [
        ("", True),
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("No", False),
        ("off", False),
    ],
)
def test_listening_for_notifications_is_on_unless_turned_off(value: str, listen: bool) -> None:
    assert load_settings({"LISTEN_NOTIFY": value}).listen_notify is listen


def test_every_variable_read_is_in_the_configuration_reference() -> None:
    read: set[str] = set()

    class Watched(dict[str, str]):
        """An empty environment that notes every name read from it."""

        def get(self, name: str, default: Any = None) -> Any:
            read.add(name)
            return super().get(name, default)

    load_settings(Watched())
    page = Path(__file__).parent.parent / "docs" / "reference" / "configuration.md"
    table = page.read_text().split("| variable | default | meaning |")[1]
    rows = [row.split("|")[1] for row in table.split("\n\n")[0].splitlines() if row.startswith("| `")]
    documented = {name for first_cell in rows for name in re.findall(r"`([A-Z_0-9]+)`", first_cell)}
    assert read and read <= documented, sorted(read - documented)
