"""Every statement the service runs is a named one from sql/queries.sql (or a migration file), values as parameters."""

from __future__ import annotations

import ast
import re

import pytest

from devkit import ROOT
from queries import QUERIES

SERVICE_MODULES = sorted(p for p in ROOT.glob("*.py") if p.name not in {"demo.py", "gunicorn.conf.py"})


def executed_statements(tree: ast.AST) -> list[ast.expr]:
    """Return the statement of every .execute(...) and .copy_expert(...) call, seen through mogrify()."""
    statements = [
        node.args[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"execute", "copy_expert"}
    ]
    return [mogrified(statement) for statement in statements]


def mogrified(statement: ast.expr) -> ast.expr:
    """Return X for cur.mogrify(X, params).decode(), else the statement itself."""
    match statement:
        case ast.Call(func=ast.Attribute(attr="decode", value=ast.Call(func=ast.Attribute(attr="mogrify"), args=args))):
            return args[0]
    return statement


@pytest.mark.parametrize("module", SERVICE_MODULES, ids=lambda p: p.name)
def test_statements_come_from_the_named_queries(module) -> None:
    for statement in executed_statements(ast.parse(module.read_text())):
        assert isinstance(statement, ast.Call), f"{module.name}:{statement.lineno} builds SQL in place"
        called = statement.func
        name = called.id if isinstance(called, ast.Name) else called.attr  # type: ignore[union-attr]
        assert name in {"query", "table_query", "read_text"}, f"{module.name}:{statement.lineno} runs {name}(...)"
        if name == "read_text":
            assert module.name == "migrations.py"


def test_named_queries_take_values_only_as_named_parameters() -> None:
    for name, text in QUERIES.items():
        assert "%s" not in text, name
        assert not re.search(r"\{(?!table\})", text), f"{name} has a placeholder other than {{table}}"
