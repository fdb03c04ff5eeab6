"""Every alert rule has its runbook in docs/operate/alerts/, and a runbook names only what the service has: its
API paths (as the OpenAPI document serves them), its metrics (as metrics.py defines them) and its console pages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from werkzeug.exceptions import HTTPException
from werkzeug.routing import MapAdapter

import metrics
from devkit import ROOT
from tests.document import openapi_document

ALERTS = ROOT / "monitoring" / "alerts.yaml"
RUNBOOKS = ROOT / "docs" / "operate" / "alerts"
HEADINGS = ["Check", "Act", "It worked when"]
# A path as a runbook writes it, in a command or in the text: up to white space, a quote, a query or a fragment.
API_PATH = re.compile(r"/api/v1/[^\s`'\"()\[\]?#]*")
CONSOLE_PATH = re.compile(r"/console(?:/[^\s`'\"()\[\]?#]*)?")
METRIC = re.compile(r"\bconsistency_[a-z0-9_]*[a-z0-9]")
# What a series adds to its family's name: a counter's _total, a histogram's _bucket, _sum and _count.
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")
# A part of a path a runbook leaves for the reader to fill in: <queue>, <queue_id>, <id>, <account>.
PLACEHOLDER = re.compile(r"<[^<>/]+>")
# Console endpoints that are no page of their own: the answer to any other path, and the stylesheet.
NOT_PAGES = {"console.no_such_page", "console.static"}


def alert_rules() -> list[dict[str, Any]]:
    """Every alert rule of monitoring/alerts.yaml, in the file's order."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


RULES = alert_rules()
NAMES = [rule["alert"] for rule in RULES]


def runbook(name: str) -> Path:
    """Where an alert's runbook is."""
    return RUNBOOKS / f"{name}.md"


def mentioned(pattern: re.Pattern[str], text: str) -> set[str]:
    """Every path or name a text mentions, without the punctuation of the sentence around it."""
    return {found.rstrip(".,:;") for found in pattern.findall(text)}


def template(path: str) -> re.Pattern[str]:
    """A path of the OpenAPI document as a pattern: each {parameter} stands for one segment, filled in or not."""
    return re.compile("[^/]+".join(re.escape(part) for part in re.split(r"\{[^/{}]+\}", path)))


@cache
def served_paths() -> tuple[re.Pattern[str], ...]:
    """The paths of the served OpenAPI document, as patterns."""
    return tuple(template(path) for path in openapi_document()["paths"])


def is_served(path: str) -> bool:
    """Whether a path a runbook names is one of the document's, as written or filled in."""
    return any(pattern.fullmatch(path) for pattern in served_paths())


def metric_families() -> set[str]:
    """The name of every metric family metrics.py defines (a counter's without _total)."""
    wrappers = [value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)]
    return {family.name for wrapper in wrappers for family in wrapper.describe()}


@pytest.fixture(scope="module")
def console_routes() -> Iterator[MapAdapter]:
    """The app's routes, to match paths against; an app on the default settings connects to nothing."""
    from config import Settings
    from consistency_manager_svc import create_app
    from service import service_of

    app = create_app(Settings())
    yield app.url_map.bind("localhost")
    service_of(app).close()


@pytest.mark.parametrize("rule", RULES, ids=NAMES)
def test_every_alert_has_a_runbook_with_its_title_and_the_three_headings(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert rule["annotations"]["runbook_url"].endswith(f"/operate/alerts/{name}/")
    assert runbook(name).is_file(), f"{runbook(name).relative_to(ROOT)} is missing"
    lines = runbook(name).read_text(encoding="utf-8").splitlines()
    assert lines[0] == f"# {name}"
    headings = [line.removeprefix("## ") for line in lines if line.startswith("## ")]
    assert [heading for heading in headings if heading in HEADINGS] == HEADINGS


def test_every_file_among_the_runbooks_belongs_to_an_alert() -> None:
    assert sorted({path.name for path in RUNBOOKS.iterdir()} - {runbook(name).name for name in NAMES}) == []


@pytest.mark.parametrize("name", NAMES)
def test_every_api_path_a_runbook_names_is_in_the_served_document(name: str) -> None:
    paths = mentioned(API_PATH, runbook(name).read_text(encoding="utf-8"))
    assert sorted(path for path in paths if not is_served(path)) == []


@pytest.mark.parametrize("name", NAMES)
def test_every_metric_a_runbook_names_is_one_the_service_defines(name: str) -> None:
    names = mentioned(METRIC, runbook(name).read_text(encoding="utf-8"))
    served = {family + suffix for family in metric_families() for suffix in SUFFIXES}
    assert names, "a runbook names the metric its alert reads"
    assert sorted(names - served) == []


@pytest.mark.parametrize("name", NAMES)
def test_every_console_path_a_runbook_names_is_a_console_page(name: str, console_routes: MapAdapter) -> None:
    pages = mentioned(CONSOLE_PATH, runbook(name).read_text(encoding="utf-8"))
    wrong = []
    for page in sorted(pages):
        try:
            endpoint, _ = console_routes.match(PLACEHOLDER.sub("1", page), method="GET")
        except HTTPException:
            endpoint = None
        if not isinstance(endpoint, str) or not endpoint.startswith("console.") or endpoint in NOT_PAGES:
            wrong.append(page)
    assert wrong == []


@pytest.mark.parametrize(
    ("path", "served"),
    [
        ("/api/v1/consistency/entries/investment/17", True),
        ("/api/v1/consistency/entries/<queue>/<queue_id>", True),
        ("/api/v1/consistency/drift-checks/latest", True),
        ("/api/v1/consistency/entries/investment/17/retry", False),
        ("/api/v1/consistency/entries", False),
        ("/api/v1/consistency/parked/investment", False),
    ],
)
def test_a_path_is_served_only_as_a_template_of_the_document_fills_it(path: str, served: bool) -> None:
    assert is_served(path) is served


def test_paths_and_metric_names_are_read_out_of_a_runbook_s_text() -> None:
    text = (
        "Open `/console/entries/<queue>/<queue_id>`, or /console/parked. Then\n"
        'curl -s "localhost:8080/api/v1/consistency/parked?reason=x" and watch `consistency_cycles_total{result="ok"}`.'
    )
    assert mentioned(CONSOLE_PATH, text) == {"/console/entries/<queue>/<queue_id>", "/console/parked"}
    assert mentioned(API_PATH, text) == {"/api/v1/consistency/parked"}
    assert mentioned(METRIC, text) == {"consistency_cycles_total"}
