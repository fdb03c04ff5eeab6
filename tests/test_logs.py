"""Log lines: one JSON object per line, one summary line per cycle, the text format, and no password."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import pytest

import logs
from service import service_of
from tests.world import World

ACCOUNT = "4000000001"
ORPHAN = "4999999999"  # an account with no portfolio
PASSWORD = "Log-pw-never-shown-42"


@pytest.fixture
def output(capsys) -> Iterator:
    """Read what the service wrote to stdout since the last read; the text format is restored afterwards."""
    capsys.readouterr()
    yield lambda: capsys.readouterr().out
    logs.configure("INFO", "text")


def json_lines(text: str) -> list[dict]:
    """Parse every line of the output as one JSON object."""
    return [json.loads(line) for line in text.splitlines()]


def summaries(lines: list[dict]) -> list[dict]:
    """Return the cycle summary lines."""
    return [line for line in lines if line.get("event") == "cycle"]


def test_each_line_is_one_json_object_with_time_level_logger_message(output) -> None:
    logs.configure("INFO", "json")
    logging.getLogger("anything").warning("a %s line", "formatted", extra={"queue": "investment", "n": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("anything").exception("it failed")

    first, second = json_lines(output())

    assert first["level"] == "WARNING" and first["logger"] == "anything" and first["message"] == "a formatted line"
    assert (first["queue"], first["n"], first["pid"]) == ("investment", 3, os.getpid())
    assert datetime.fromisoformat(first["time"]).utcoffset() == timedelta(0)
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_each_cycle_writes_exactly_one_summary_line_with_its_fields(app, world: World, output) -> None:
    logs.configure("INFO", "json")
    world.portfolio_for(ACCOUNT)
    world.request("investment", ACCOUNT)
    world.request("withdrawal", ACCOUNT, "FAILED")
    poller = service_of(app).poller

    summary = poller.run_once().to_json()
    lines = json_lines(output())
    poller.run_once()
    again = json_lines(output())

    [line] = summaries(lines)
    assert len(summaries(again)) == 1
    assert line["level"] == "INFO" and line["logger"] == "cycle"
    assert line["result"] == "ok" and line["mode"] == "exact"
    assert line["duration_ms"] == summary["duration_ms"]
    assert line["counts"]["investment"]["COMPLETED"] == 1
    assert line["counts"]["withdrawal"]["FAILED"] == 1
    assert set(line["watermarks"]) == {"investment", "withdrawal"}
    assert {"updated_at", "queue_id"} <= set(line["watermarks"]["investment"])
    assert (line["parked_entries"], line["corrections"]) == (0, 0)
    assert line["message"].startswith("consistency cycle ok in ")


def test_a_skipped_turn_writes_its_line_at_debug(app, world: World, output) -> None:
    logs.configure("DEBUG", "json")
    with world.cycle_lease_held():
        service_of(app).poller.run_once()
    [line] = summaries(json_lines(output()))
    assert (line["level"], line["result"]) == ("DEBUG", "skipped")


def with_secret(uri: str) -> str:
    """Return the URI with PASSWORD as its user's password, whatever form it had (a TCP or a socket URI)."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{PASSWORD}@{host}"))


def test_no_password_of_a_database_uri_appears_in_the_log(make_app, dbs: tuple[str, str], world: World, output):
    with_password = [with_secret(uri) for uri in dbs]
    assert all(PASSWORD in uri for uri in with_password)  # the server trusts its clients, so these connect
    app = make_app(queue_db_uri=with_password[0], portfolio_db_uri=with_password[1], log_level="DEBUG")
    logs.configure("DEBUG", "json")
    world.portfolio_for(ACCOUNT)
    world.request("investment", ACCOUNT)
    ok = service_of(app).poller.run_once().to_json()
    unreachable = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/queue-db"
    broken = make_app(queue_db_uri=unreachable, portfolio_db_uri=with_password[1], db_connect_timeout=1)
    logs.configure("DEBUG", "json")
    failed = service_of(broken).poller.run_once().to_json()
    logging.getLogger("careless").info("connecting to %s", unreachable)  # a URI logged by mistake is masked

    text = output()

    assert (ok["result"], failed["result"]) == ("ok", "error")
    assert [(line["level"], line["result"]) for line in summaries(json_lines(text))] == [
        ("INFO", "ok"),
        ("ERROR", "error"),
    ]
    assert "postgres:***@127.0.0.1:1" in text
    assert PASSWORD not in text


def test_text_format_is_for_a_terminal(app, world: World, output) -> None:
    logs.configure("INFO", "text")
    world.portfolio_for(ACCOUNT)
    world.request("investment", ACCOUNT)
    service_of(app).poller.run_once()

    lines = output().splitlines()

    [line] = [line for line in lines if " INFO cycle: " in line]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO cycle: consistency cycle ok in .*", line)
    assert "investment read=1 COMPLETED=1" in line
    assert not line.startswith("{")


def test_text_format_leaves_out_idle_cycles_and_json_writes_every_one(app, world: World, output) -> None:
    poller = service_of(app).poller
    world.portfolio_for(ACCOUNT)

    def cycle_lines() -> list[str]:
        """Run one cycle; return the summary lines it wrote."""
        poller.run_once()
        return [line for line in output().splitlines() if "consistency cycle" in line]

    logs.configure("INFO", "text")
    world.request("investment", ACCOUNT)
    world.request("withdrawal", ORPHAN, txn=False)  # no portfolio: parked, and parked again by every cycle's retry
    busy = cycle_lines()
    idle = [cycle_lines() for _ in range(3)]
    world.request("investment", ORPHAN, txn=False)
    newly_parked = cycle_lines()
    quiet_again = cycle_lines()
    logs.configure("INFO", "json")
    json_idle = [json_lines("\n".join(cycle_lines())) for _ in range(2)]

    assert len(busy) == 1 and "investment read=1 COMPLETED=1" in busy[0] and "parked=1" in busy[0]
    assert idle == [[], [], []]
    assert len(newly_parked) == 1 and re.search(r"investment read=\d+ COMPLETED=0 \S+ \S+ parked=1", newly_parked[0])
    assert quiet_again == []
    for [line] in json_idle:
        assert line["event"] == "cycle" and line["result"] == "ok"
        assert line["counts"]["investment"]["COMPLETED"] == line["counts"]["withdrawal"]["COMPLETED"] == 0
        assert line["counts"]["investment"]["parked"] + line["counts"]["withdrawal"]["parked"] == 2


def test_the_idle_filter_lets_through_every_line_but_an_idle_cycles_summary() -> None:
    idle_counts = {"read": 3, "COMPLETED": 0, "FAILED": 0, "CANCELLED": 0, "parked": 0, "corrected": 0}
    only = logs.IdleCycleFilter()

    def passes(name: str, **fields: object) -> bool:
        record = logging.LogRecord(name, logging.INFO, __file__, 1, "a line", None, None)
        record.__dict__.update(fields)
        return only.filter(record)

    assert not passes("cycle", result="ok", counts={"investment": idle_counts}, error=None)
    assert passes("cycle", result="error", counts={"investment": idle_counts}, error="queue-db: down")
    assert passes("cycle", result="skipped")
    assert passes("cycle")  # the cycle logger's other lines, such as the watermark mode
    assert passes("poller", result="ok", counts={"investment": idle_counts})
    for key in ("FAILED", "corrected", "reconciled"):
        assert passes("cycle", result="ok", counts={"investment": {**idle_counts, key: 1}}, error=None), key
