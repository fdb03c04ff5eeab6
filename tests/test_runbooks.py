"""Every runbook of docs/operate/ says what it needs, its steps and how to tell it worked; every alert rule has its
runbook in docs/operate/alerts/; and a runbook names only what the service has: its API paths (as the OpenAPI
document serves them), its metrics (as metrics.py defines them) and its console pages."""

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
OPERATE = ROOT / "docs" / "operate"
RUNBOOKS = OPERATE / "alerts"
# The runbooks of situations, as the site's navigation lists them.
SITUATIONS = [
    "triage-parked",
    "pause",
    "drift-finding",
    "correction",
    "adopt",
    "restore-queue-db",
    "restore-portfolio-db",
    "rotate-tokens",
    "replica-stuck",
    "metrics-and-logs",
]
# The sections every runbook has, in this order: what it needs, the steps (an alert's are what to check and how
# to act), and how to tell it worked.
SITUATION_HEADINGS = ["What it needs", "Steps", "How to tell it worked"]
HEADINGS = ["What it needs", "Check", "Act", "How to tell it worked"]
# A path as a runbook writes it, in a command or in the text: up to white space, a quote, a query or a fragment.
API_PATH = re.compile(r"/api/v1/[^\s`'\"()\[\]?#]*")
CONSOLE_PATH = re.compile(r"/console(?:/[^\s`'\"()\[\]?#]*)?")
# A metric's name; the demo's databases (consistency_demo_...), the app module and the example role are not.
METRIC = re.compile(r"\bconsistency_(?!demo_|manager\b|manager_svc\b)[a-z0-9_]*[a-z0-9]")
# What a series adds to its family's name: a counter's _total, a histogram's _bucket, _sum and _count.
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")
# A part of a path a runbook leaves for the reader to fill in: <queue>, <queue_id>, <id>, <account>.
PLACEHOLDER = re.compile(r"<[^<>/]+>")
# Console endpoints that are no page of their own: the answer to any other path, and the stylesheet.
NOT_PAGES = {"console.no_such_page", "console.static"}
# Links from one page to another, as Markdown writes them: [text](target).
LINK = re.compile(r"\]\(([^)\s]+)\)")


def alert_rules() -> list[dict[str, Any]]:
    """Every alert rule of monitoring/alerts.yaml, in the file's order."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


RULES = alert_rules()
NAMES = [rule["alert"] for rule in RULES]


def runbook(name: str) -> Path:
    """Where an alert's runbook is."""
    return RUNBOOKS / f"{name}.md"


def situation(name: str) -> Path:
    """Where a situation's runbook is."""
    return OPERATE / f"{name}.md"


# Every runbook, a situation's or an alert's, by the name its tests show.
PAGES = {**{name: situation(name) for name in SITUATIONS}, **{name: runbook(name) for name in NAMES}}


def headings(page: Path) -> list[str]:
    """The second-level headings of a page, in order, outside its code blocks."""
    found, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            found.append(line.removeprefix("## ").strip())
    return found


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
def test_every_alert_has_a_runbook_with_its_title_and_the_four_headings(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert rule["annotations"]["runbook_url"].endswith(f"/operate/alerts/{name}/")
    assert runbook(name).is_file(), f"{runbook(name).relative_to(ROOT)} is missing"
    assert runbook(name).read_text(encoding="utf-8").splitlines()[0] == f"# {name}"
    assert [heading for heading in headings(runbook(name)) if heading in HEADINGS] == HEADINGS


@pytest.mark.parametrize("name", SITUATIONS)
def test_every_situation_has_a_runbook_that_says_what_it_needs_its_steps_and_how_to_tell_it_worked(name: str) -> None:
    assert situation(name).is_file(), f"{situation(name).relative_to(ROOT)} is missing"
    assert situation(name).read_text(encoding="utf-8").startswith("# ")
    assert [heading for heading in headings(situation(name)) if heading in SITUATION_HEADINGS] == SITUATION_HEADINGS


def test_every_file_among_the_runbooks_belongs_to_an_alert_or_a_situation() -> None:
    assert sorted({path.name for path in RUNBOOKS.iterdir()} - {runbook(name).name for name in NAMES}) == []
    pages = {path.name for path in OPERATE.glob("*.md")}
    assert sorted(pages - {situation(name).name for name in SITUATIONS} - {"index.md"}) == []


def test_the_operate_index_links_every_runbook() -> None:
    linked = set(LINK.findall((OPERATE / "index.md").read_text(encoding="utf-8")))
    wanted = {f"{name}.md" for name in SITUATIONS} | {f"alerts/{name}.md" for name in NAMES}
    assert sorted(wanted - linked) == []


@pytest.mark.parametrize("name", list(PAGES))
def test_every_link_of_a_runbook_reaches_a_page(name: str) -> None:
    page = PAGES[name]
    targets = [target.split("#")[0] for target in LINK.findall(page.read_text(encoding="utf-8"))]
    local = [target for target in targets if target and "://" not in target]
    assert sorted(target for target in local if not (page.parent / target).resolve().is_file()) == []


@pytest.mark.parametrize("name", list(PAGES))
def test_every_api_path_a_runbook_names_is_in_the_served_document(name: str) -> None:
    paths = mentioned(API_PATH, PAGES[name].read_text(encoding="utf-8"))
    assert sorted(path for path in paths if not is_served(path)) == []


@pytest.mark.parametrize("name", list(PAGES))
def test_every_metric_a_runbook_names_is_one_the_service_defines(name: str) -> None:
    names = mentioned(METRIC, PAGES[name].read_text(encoding="utf-8"))
    served = {family + suffix for family in metric_families() for suffix in SUFFIXES}
    if name in NAMES:
        assert names, "an alert's runbook names the metric its alert reads"
    assert sorted(names - served) == []


@pytest.mark.parametrize("name", list(PAGES))
def test_every_console_path_a_runbook_names_is_a_console_page(name: str, console_routes: MapAdapter) -> None:
    pages = mentioned(CONSOLE_PATH, PAGES[name].read_text(encoding="utf-8"))
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
    names = "psql -d consistency_demo_queue -v service_role=consistency_manager; gunicorn consistency_manager_svc:app"
    assert mentioned(METRIC, names) == set()
