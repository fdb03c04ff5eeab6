"""The README is the door and docs/ the house: the README stays small and keeps its two commands, every relative
link leads to a file, and the reference pages name every endpoint, metric, log event and alert rule there is."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

from devkit import ROOT
from tests.document import openapi_document
from tests.test_metrics import scrape

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
REFERENCE = DOCS / "reference"
# The README's opening commands, byte for byte: what a newcomer types first.
TWO_COMMANDS = """```bash
make demo   # sample databases + the service on http://127.0.0.1:8080, with curl commands to try
make test   # lint (ruff, mypy --strict), then every test against real PostgreSQL
```
"""
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# A Markdown link or image, [text](target) or ![alt](target), whose text may run over lines.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# How a page names an endpoint: `GET /path`, its parameters as <name> (or {name}), perhaps with a query after it.
ENDPOINT = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE) (/[^\s`?]*)")
PARAMETER = re.compile(r"<[^<>/]+>|\{[^{}/]+\}")


def prose(text: str) -> str:
    """A page without its fenced blocks and code spans, where a link is no link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def relative_links(page: Path) -> list[str]:
    """Every link of a page that points at a file of this repository rather than at a host or an anchor."""
    targets = LINK.findall(prose(page.read_text(encoding="utf-8")))
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)]


def hooks() -> ModuleType:
    """docs/hooks.py, the MkDocs hooks, loaded as the site's build loads it."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def operations() -> list[tuple[str, str]]:
    """Every operation of the served OpenAPI document, as (METHOD, path)."""
    return [(method.upper(), path) for path, item in openapi_document()["paths"].items() for method in item]


def shape(path: str) -> str:
    """A path with each parameter, however a page or the document names it, as {}."""
    return PARAMETER.sub("{}", path)


def table_rows(page: Path) -> list[list[str]]:
    """The cells of every table row of a page, the header and the rules under it included."""
    rows = [line for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


# The README


def test_the_readme_is_a_door_under_12_kb() -> None:
    assert len(README.read_bytes()) < 12_000


def test_the_readme_keeps_its_two_commands_as_they_are() -> None:
    text = README.read_text(encoding="utf-8")
    assert TWO_COMMANDS in text
    assert text.index(TWO_COMMANDS) < text.index("\n## ")  # on the first screen, before any section


# Links


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_of_a_page_leads_to_a_file(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (page.parent / path).resolve().exists():
            broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)} links to files that do not exist"


def test_links_are_read_out_of_prose_and_not_out_of_code() -> None:
    text = 'See [a](a.md), ![b](images/b.png "title"), [c](https://x.example/c) and [d](#d).\n`[e](e.md)`\n'
    text += "```bash\n[f](f.md)\n```\n[g\nover lines](../g.md#part)\n"
    assert LINK.findall(prose(text)) == ["a.md", "images/b.png", "https://x.example/c", "#d", "../g.md#part"]


# The endpoints


@pytest.fixture(scope="module")
def endpoints_page() -> str:
    """The endpoints page as the site's build writes it, from the served document."""
    module = hooks()
    page = SimpleNamespace(file=SimpleNamespace(src_uri=module.PAGE))
    written: str = module.on_page_markdown((DOCS / module.PAGE).read_text(encoding="utf-8"), page, None, None)
    return written


def test_the_endpoints_page_shows_every_operation_of_the_served_document(endpoints_page: str) -> None:
    missing = [f"{method} {path}" for method, path in operations() if f"### {method} `{path}`" not in endpoints_page]
    assert missing == []
    models = openapi_document()["components"]["schemas"]
    assert [name for name in models if f"### {name}\n" not in endpoints_page] == []


def test_the_http_api_page_tells_what_every_operation_does() -> None:
    named = {(method, shape(path)) for method, path in ENDPOINT.findall((REFERENCE / "http-api.md").read_text())}
    assert sorted(f"{method} {path}" for method, path in operations() if (method, shape(path)) not in named) == []


def test_every_route_of_the_app_but_the_pages_is_in_the_served_document(url_map: Any) -> None:
    documented = {(method, shape(path)) for method, path in operations()}
    pages = ("/console", "/static/", "/api/v1/docs")  # the console, its files, and the document's own pages
    routes = {
        (method, shape(rule.rule))
        for rule in url_map.iter_rules()
        if not rule.rule.startswith(pages)
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert sorted(routes - documented) == []


@pytest.fixture(scope="module")
def url_map() -> Iterator[Any]:
    """The app's routes; an app on the default settings connects to nothing."""
    from config import Settings
    from consistency_manager_svc import create_app
    from service import service_of

    app = create_app(Settings())
    yield app.url_map
    service_of(app).close()


# The metrics, the log events, the alert rules


def test_the_metrics_page_lists_every_family_a_live_metrics_serves_with_its_type(client) -> None:
    types, _ = scrape(client)
    # The test's single process also serves each counter's and histogram's _created as a gauge of its own, which
    # gunicorn's workers (multiprocess mode) do not.
    created = {f"{name}_created" for name, kind in types.items() if kind in ("counter", "histogram")}
    served = {name: kind for name, kind in types.items() if name.startswith("consistency_") and name not in created}
    rows = [row for row in table_rows(REFERENCE / "metrics.md") if re.fullmatch(r"`consistency_\w+`", row[0])]
    # A counter's family is its name without _total, as the parser of the text format names it.
    documented = {re.sub(r"_total$", "", row[0].strip("`")): row[1] for row in rows}
    assert documented == served


def test_the_log_events_page_lists_every_event_the_code_writes() -> None:
    sources = [*ROOT.glob("*.py"), *ROOT.glob("console/*.py")]
    written = {event for source in sources for event in re.findall(r'"event": "(\w+)"', source.read_text())}
    assert written, "the code writes events"
    events = (REFERENCE / "logs.md").read_text(encoding="utf-8").split("\n## Events\n")[1].split("\n## ")[0]
    listed = {found for found in re.findall(r"^\| `(\w+)` \|", events, re.M)}
    assert sorted(written - listed) == []


def test_the_alert_rules_page_lists_every_rule_with_a_link_to_its_runbook() -> None:
    document = yaml.safe_load((ROOT / "monitoring" / "alerts.yaml").read_text(encoding="utf-8"))
    rules = [rule["alert"] for group in document["groups"] for rule in group["rules"] if "alert" in rule]
    rows = {row[0].strip("`"): row for row in table_rows(REFERENCE / "alerts.md") if row[0].startswith("`")}
    assert sorted(rows) == sorted(rules)
    for name in rules:
        assert f"](../operate/alerts/{name}.md)" in rows[name][-1], name
