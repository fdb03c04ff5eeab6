"""The code's shape: the typed cycle result matches its OpenAPI schema, units fit on a screen, the domain is a leaf."""

from __future__ import annotations

import ast
import dataclasses
from datetime import UTC, datetime
from typing import get_args

import pytest

from devkit import ROOT
from domain import COUNT_KEYS, QUEUES, CycleResult, CycleWork, Mode, Outcome
from models import CycleSummary
from tests.document import openapi_document

SERVICE_MODULES = sorted(p for p in ROOT.glob("*.py") if p.name not in {"demo.py", "gunicorn.conf.py"})
WORK = CycleWork(
    mode="exact",
    horizon=datetime(2026, 1, 2, tzinfo=UTC),
    oldest_transaction_s=None,
    prepared_transactions=0,
    untracked_sessions=0,
    reconciled=False,
    counts={queue.name: dict.fromkeys(COUNT_KEYS, 0) for queue in QUEUES},
    stopped_early=False,
    cycle=7,
)
STARTED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
RESULTS = [
    CycleResult(STARTED, "ok", 12.5, WORK),
    CycleResult(STARTED, "error", 3.0, error="queue-db: connection refused"),
    CycleResult(STARTED, "error", 3.0, WORK, error="user-portfolio-db: the summary could not be stored"),
    CycleResult(STARTED, "skipped", 0.4),
    CycleResult(STARTED, "paused", 0.6),
    CycleResult(STARTED, "paused", 8.0, WORK),
]


def test_the_summary_model_names_every_field_of_the_cycle_result_and_no_other() -> None:
    fields = {f.name for f in dataclasses.fields(CycleResult)} - {"outcome", "work"}
    fields |= {"result"} | {f.name for f in dataclasses.fields(CycleWork)}
    assert set(CycleSummary.model_fields) == fields
    schema = openapi_document()["components"]["schemas"]["CycleSummary"]["properties"]
    assert schema["result"]["enum"] == list(get_args(Outcome))
    assert list(get_args(Mode)) in [option.get("enum") for option in schema["mode"]["anyOf"]]


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: f"{r.outcome}{'' if r.work is None else '+work'}")
def test_every_kind_of_cycle_result_is_valid_against_the_summary_model(result: CycleResult) -> None:
    summary = result.to_json()
    shown = CycleSummary.model_validate(summary).model_dump(mode="json", exclude_unset=True)
    assert shown["result"] == result.outcome and shown["duration_ms"] == result.duration_ms
    assert set(shown) == set(summary)
    if result.work is not None:
        assert {queue: set(counts) for queue, counts in shown["counts"].items()} == {
            queue.name: set(COUNT_KEYS) for queue in QUEUES
        }


def definitions(module: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """Every function, method and class a module defines."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [node for node in ast.walk(module) if isinstance(node, kinds)]


@pytest.mark.parametrize("path", SERVICE_MODULES, ids=lambda p: p.name)
def test_functions_fit_on_a_screen_and_classes_stay_small(path) -> None:
    for node in definitions(ast.parse(path.read_text())):
        lines = (node.end_lineno or node.lineno) - node.lineno + 1
        limit = 160 if isinstance(node, ast.ClassDef) else 40
        assert lines <= limit, f"{path.name}:{node.lineno} {node.name} has {lines} lines"


def test_at_most_two_public_names_say_apply() -> None:
    public = [
        f"{path.name}:{node.name}"
        for path in SERVICE_MODULES
        for node in definitions(ast.parse(path.read_text()))
        if "apply" in node.name and not node.name.startswith("_")
    ]
    assert len(public) <= 2, public


def imported_modules(path) -> set[str]:
    """The top-level names of the modules a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_domain_module_is_a_leaf() -> None:
    own = {path.stem for path in SERVICE_MODULES}
    assert imported_modules(ROOT / "domain.py") <= {"__future__", "dataclasses", "datetime", "time", "typing", "uuid"}
    assert not imported_modules(ROOT / "domain.py") & own


@pytest.mark.parametrize("literal", ["queue-db", "user-portfolio-db", "CANCELLED", "TIER1_MV", "investment_queue"])
def test_domain_constants_are_written_only_in_the_domain_module(literal: str) -> None:
    writers = [
        path.name
        for path in SERVICE_MODULES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value == literal
    ]
    assert writers == ["domain.py"] * len(writers) and writers, writers


def attribute_names(path) -> set[str]:
    """Every attribute name a file reads or writes."""
    return {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}


def test_the_http_layer_reaches_no_part_of_the_service_but_its_methods_and_settings() -> None:
    parts = {"poller", "runner", "cache", "queue_db", "portfolio_db", "listener", "progress"}
    assert not attribute_names(ROOT / "api.py") & parts


def test_nothing_is_assigned_to_the_wired_objects_after_they_are_built() -> None:
    build = next(
        node
        for node in ast.walk(ast.parse((ROOT / "service.py").read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == "build_service"
    )
    targets = [t for node in ast.walk(build) if isinstance(node, ast.Assign) for t in node.targets]
    assert all(isinstance(target, ast.Name) for target in targets), "build_service assigns an attribute"


def test_the_unexpected_error_message_is_written_once() -> None:
    writers = [
        path.name
        for path in SERVICE_MODULES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "see the service log" in node.value
    ]
    assert writers == ["service.py"]


def test_the_benchmark_imports_nothing_from_the_tests() -> None:
    for path in sorted((ROOT / "bench").glob("*.py")):
        assert "tests" not in imported_modules(path), path.name
