"""MkDocs hooks: the endpoints page, written at build time from the OpenAPI document the service serves.

The document comes from the app itself, built as gunicorn builds it but on the default settings, which connects to
no database: the page lists what the service serves, and cannot go stale.
"""

from __future__ import annotations

import html
import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The page the endpoints are written into, and the line of it they replace.
PAGE = "reference/endpoints.md"
MARKER = "<!-- endpoints: written from the served OpenAPI document by docs/hooks.py -->"
METHODS = ("get", "post", "put", "patch", "delete")


def served_document() -> dict[str, Any]:
    """The OpenAPI document of an app on the default settings, as /api/v1/openapi.json serves it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from config import Settings
    from consistency_manager_svc import create_app
    from service import service_of

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    app = create_app(Settings())
    try:
        document: dict[str, Any] = app.api_doc  # type: ignore[attr-defined]
        return document
    finally:
        service_of(app).close()
        root.handlers[:], root.level = handlers, level  # the app's log handler stays out of MkDocs' output


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Write the endpoints into their page; leave every other page as it is."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its marker line: {MARKER}")
    return markdown.replace(MARKER, render(served_document()))


def render(document: dict[str, Any]) -> str:
    """The Markdown of every operation, grouped by tag, then of every model the operations name."""
    described = {tag["name"]: tag.get("description", "") for tag in document.get("tags", [])}
    operations = [
        (method, path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]
    order = list(described) + sorted({tag for _, _, op in operations for tag in op.get("tags", [])} - set(described))
    parts = []
    for tag in order:
        tagged = [each for each in operations if tag in each[2].get("tags", [])]
        if tagged:
            parts.append(f"## {tag.capitalize()}\n\n{text(described.get(tag, ''))}\n")
            parts.extend(render_operation(*each) for each in tagged)
    untagged = [each for each in operations if not each[2].get("tags")]
    if untagged:
        parts.append("## Other\n")
        parts.extend(render_operation(*each) for each in untagged)
    parts.append("## Models\n\nThe JSON bodies the operations above take and answer.\n")
    parts.extend(render_model(name, schema) for name, schema in document["components"]["schemas"].items())
    return "\n".join(parts)


def render_operation(method: str, path: str, operation: dict[str, Any]) -> str:
    """One operation: its summary, who may call it, its parameters, its body and its answers."""
    # flask-openapi3 takes a view's first docstring line as the summary and the rest as the description.
    said = " ".join(part for part in (operation.get("summary", ""), operation.get("description", "")) if part)
    lines = [f"### {method.upper()} `{path}`", "", text(said)]
    lines += ["", f"Token: {token(method, operation)}."]
    parameters = operation.get("parameters", [])
    if parameters:
        lines += ["", "| parameter | in | type | required | meaning |", "|---|---|---|---|---|"]
        for parameter in parameters:
            schema = parameter.get("schema", {})
            meaning = parameter.get("description") or schema.get("description", "")
            required = "yes" if parameter.get("required") else "no"
            row = [f"`{parameter['name']}`", parameter["in"], kind(schema), required, text(meaning)]
            lines.append("| " + " | ".join(row) + " |")
    body = operation.get("requestBody")
    if body:
        needed = "required" if body.get("required") else "optional"
        lines += ["", f"Body ({needed}): " + ", ".join(media(body.get("content", {})))]
    lines += ["", "| status | meaning | body |", "|---|---|---|"]
    for status, answer in operation.get("responses", {}).items():
        body_types = ", ".join(media(answer.get("content", {})))
        lines.append(f"| {status} | {text(answer.get('description', ''))} | {body_types} |")
    return "\n".join(lines) + "\n"


def token(method: str, operation: dict[str, Any]) -> str:
    """Which token an operation needs: none, a read token (GET), or an operate token (the actions)."""
    if not operation.get("security"):
        return "none"
    return "`read` or `operate`" if method == "get" else "`operate`"


def media(content: dict[str, Any]) -> list[str]:
    """Each media type of a body, with the type of what it holds."""
    return [f"`{kind_name}` {kind(schema.get('schema', {}))}" for kind_name, schema in content.items()]


def render_model(name: str, schema: dict[str, Any]) -> str:
    """One model of the document: what it is, and each of its fields."""
    lines = [f"### {name}", "", text(schema.get("description", ""))]
    properties = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", []))
        lines += ["", "| field | type | required | meaning |", "|---|---|---|---|"]
        for field, each in properties.items():
            row = [f"`{field}`", kind(each), "yes" if field in required else "no", text(each.get("description", ""))]
            lines.append("| " + " | ".join(row) + " |")
    else:
        lines += ["", f"A {kind(schema)}."]
    return "\n".join(lines) + "\n"


def kind(schema: dict[str, Any]) -> str:
    """A schema's type in words: a model's name links to it; choices, lists, maps and bounds are spelled out."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema or "oneOf" in schema:
        return " or ".join(kind(each) for each in schema.get("anyOf", schema.get("oneOf", [])))
    if "enum" in schema:
        return "one of " + ", ".join(f"`{value}`" for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if schema.get("type") == "array":
        return "array of " + kind(schema.get("items", {}))
    if schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        return "map of " + kind(schema["additionalProperties"])
    return str(schema.get("type", "any")) + bounds(schema)


def bounds(schema: dict[str, Any]) -> str:
    """A number's or a string's bounds, when the schema gives them."""
    said = []
    for key, words in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            said.append(f"{words} {schema[key]:g}")
    if "maxLength" in schema:
        said.append(f"{schema.get('minLength', 0)} to {schema['maxLength']} characters")
    return f" ({', '.join(said)})" if said else ""


def text(words: str) -> str:
    """Prose for a table cell or a paragraph: one line, no bare pipe, and no angle bracket outside code."""
    parts = " ".join(words.split()).replace("|", "\\|").split("`")
    return "`".join(html.escape(part, quote=False) if i % 2 == 0 else part for i, part in enumerate(parts))
