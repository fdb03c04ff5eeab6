"""The Grafana dashboard's queries parse as PromQL and name only metrics the service serves; alerts have runbooks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit import ROOT
from tests.test_metrics import scrape

DASHBOARD = ROOT / "monitoring" / "grafana" / "consistency-manager.json"
ALERTS = ROOT / "monitoring" / "alerts.yaml"
# Where the runbooks will be published: a placeholder (.invalid never resolves) that the alert rules' reference page
# says to replace.
RUNBOOK_BASE = "https://docs.example.invalid"
# Grafana's variables, each replaced by a value Prometheus accepts, so that promtool reads the expression as sent.
VARIABLES = {
    "$__rate_interval": "2m",
    "$__interval": "30s",
    "$__range": "6h",
    "${datasource}": "prometheus",
    "$datasource": "prometheus",
}
# PromQL words that look like metric names: keywords, and the operators written as words.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
KEYWORDS |= {"atan2", "inf", "nan", "start", "end"}
NAME = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows (collapsed or not) included."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Every target's PromQL expression, named by its panel id and refId, template variables replaced."""
    found = []
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r} uses a variable the test does not know: {expr}"
            found.append((f"dashboard:panel_{panel['id']}_{target['refId']}", expr))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, labels, ranges and functions are out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers, and the label names in them
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in NAME.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group().lower() not in KEYWORDS:
            names.add(match.group())
    return names


def family(name: str) -> str:
    """The family a series name belongs to: a counter's without _total, a histogram's without _bucket, and so on."""
    return re.sub(r"_(total|created|bucket|sum|count)$", "", name)


def promtool() -> str:
    """The promtool on PATH; fail, never skip, without it: CI installs it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: `make promtool`, or `apt-get install prometheus` (Debian's package ships"
            " promtool; its server need not run). CI installs it (.ci/deploy-checks)."
        )
    return path


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    """The dashboard's JSON model."""
    model: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return model


@pytest.fixture
def served(client) -> set[str]:
    """The names of the service's own series in a live /metrics: a counter's _total, a histogram's _bucket and so on.

    Only the consistency_ families: the test's single process also serves prometheus_client's process and
    platform metrics, which gunicorn's workers (multiprocess mode) do not.
    """
    _, samples = scrape(client)
    return {name for name, _ in samples if name.startswith("consistency_")}


def test_the_dashboard_imports_anywhere_through_its_datasource_variable(dashboard) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and "__inputs" not in dashboard
    ids = [panel["id"] for panel in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard["panels"]):
        for each in [panel, *panel.get("targets", [])] if panel["type"] != "row" else []:
            assert each["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_every_panel_query_parses_as_promql(dashboard, tmp_path: Path) -> None:
    rules = [{"record": record, "expr": expr} for record, expr in expressions(dashboard)]
    assert len(rules) >= 20
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    checked = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_panel_query_names_only_metrics_the_service_serves(dashboard, served: set[str]) -> None:
    for record, expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"{record} selects no metric by name: {expr}"
        assert names <= served, f"{record} names {sorted(names - served)}, which /metrics does not serve: {expr}"


def test_every_metric_family_the_service_serves_is_on_the_dashboard(dashboard, served: set[str]) -> None:
    shown = set().union(*(metric_names(expr) for _, expr in expressions(dashboard)))
    missing = {family(name) for name in served} - {family(name) for name in shown}
    assert not missing, f"no panel shows {sorted(missing)}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{job=~"x.*", le!="1"}[5m] offset 1h))', {"a_bucket"}),
        ("time() - max(b) > 5 * 30 unless max(c) > 0", {"b", "c"}),
        ("a / on (x) group_left (y) b > bool c", {"a", "b", "c"}),
        ('histogram_quantile(0.99, d) + count_values("e", f) + 1e3 + g[1h:5m]', {"d", "f", "g"}),
    ],
)
def test_metric_names_are_read_out_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_alert_has_a_runbook_url_under_the_documented_base() -> None:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    alerts = [rule for rule in rules if "alert" in rule]
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert rule["annotations"].get("runbook_url") == f"{RUNBOOK_BASE}/operate/alerts/{name}/", name
    assert RUNBOOK_BASE in (ROOT / "docs" / "reference" / "alerts.md").read_text()  # which says to replace it
