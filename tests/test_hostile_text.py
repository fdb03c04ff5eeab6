"""Hostile text at every door: each field and parameter of each endpoint of the OpenAPI document, given arbitrary
text (NUL, lone surrogates, controls, right-to-left marks, emoji, markup), never gets a 5xx. Text PostgreSQL cannot
store is refused with 400 naming the field; other text is never refused for its characters, and comes back exactly
where the service keeps it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from config import Settings
from devkit import postgres
from service import service_of
from tests.conftest import API_TOKEN
from tests.document import openapi_document
from tests.world import World

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # PostgreSQL text takes no NUL, and UTF-8 has no lone surrogate
REFUSED_FOR_CHARACTERS = re.compile("NUL|surrogate")
UNDECLARED = "note"  # a query parameter no endpoint declares: the boundary covers every endpoint all the same
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
ACCOUNT = "4000000001"
STATUS, AUDIT = "/api/v1/consistency/status", "/api/v1/consistency/audit"
PAUSE, RESUME = "/api/v1/consistency/pause", "/api/v1/consistency/resume"
LATEST_DRIFT_CHECK = "/api/v1/consistency/drift-checks/latest"
STORABLE_EXAMPLE = "<script>alert(1)</script> \u200f\u05e9\u05dc\u05d5\u05dd\u200e 😀 a\tb"  # RTL marks, Hebrew

# Any code point, surrogates (Cs) and controls (Cc) included, with the troublesome ones drawn often.
HOSTILE = st.text(
    alphabet=st.one_of(
        st.characters(exclude_categories=()),
        st.sampled_from(["\x00", "\ud800", "\udfff", "\x1f", "\u200f", "\u202e", "😀", "<", "\\", '"', "/", " "]),
    ),
    max_size=24,
)


def resolved(schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a schema's $ref within the OpenAPI document."""
    while "$ref" in schema:
        node: Any = openapi_document()
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def body_schema(operation: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema of an operation's request body, or None when it takes none."""
    body = operation.get("requestBody")
    return None if body is None else resolved(body["content"]["application/json"]["schema"])


def body_fields(schema: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every field of a body schema, nested ones dotted (`filter.account`), with its schema."""
    for name, field in resolved(schema).get("properties", {}).items():
        yield f"{prefix}{name}", field
        yield from body_fields(field, f"{prefix}{name}.")


def valid(schema: dict[str, Any]) -> Any:
    """A valid value of a schema: its default, first choice, or a plain value of its type."""
    schema = resolved(schema)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return valid(schema[key][0])
    if "default" in schema or "enum" in schema:
        return schema.get("default", schema.get("enum", [None])[0])
    kind = schema.get("type")
    if kind == "object":
        fields = schema.get("properties", {})
        names = schema.get("required") or list(fields)[: schema.get("minProperties", 0)]
        return {name: valid(fields[name]) for name in names}
    if kind == "string":
        return "2020-01-01T00:00:00+00:00" if schema.get("format") == "date-time" else "plain text"
    if kind in ("integer", "number"):
        return schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1)
    return False if kind == "boolean" else None


def keeps_text(schema: dict[str, Any]) -> bool:
    """Whether a field takes any non-blank text as given: a string with no choices, format or shape."""
    schema = resolved(schema)
    options = [resolved(s) for s in schema.get("anyOf", schema.get("oneOf", [schema]))]
    shapeless = [o for o in options if o.get("type") == "string" and not {"enum", "format"} & o.keys()]
    return any(o.get("pattern", r"\S") == r"\S" for o in shapeless)


@dataclass(frozen=True)
class Target:
    """One place a caller puts text: a query or path parameter, or a (dotted) body field, of one operation."""

    method: str
    path: str
    where: str  # query, path or body
    name: str
    schema: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.path} {self.where}:{self.name}"

    @property
    def operation(self) -> dict[str, Any]:
        """The operation in the OpenAPI document."""
        operation: dict[str, Any] = openapi_document()["paths"][self.path][self.method]
        return operation


def targets() -> list[Target]:
    """Every parameter and body field of every operation of the OpenAPI document, and an undeclared parameter."""
    found = []
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                found.append(Target(method, path, parameter["in"], parameter["name"], parameter["schema"]))
            schema = body_schema(operation)
            if schema is not None:
                found.extend(Target(method, path, "body", name, field) for name, field in body_fields(schema))
            found.append(Target(method, path, "query", UNDECLARED, {}))
    return found


def escaped(text: str) -> str:
    """Percent-encode text for a URL, lone surrogates as their (invalid) UTF-8 bytes."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def strings(value: Any) -> set[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set(value).union(*(strings(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(strings(v) for v in value))
    return set()


@dataclass
class Stage:
    """The app on databases of its own for the whole module, its client, and direct connections to them."""

    app: Flask
    client: FlaskClient
    world: World

    def arrange(self, target: Target) -> None:
        """Let the operation do its work: a parked entry to act on, no drift check running, paused only to resume."""
        if self.world.p("SELECT 1 FROM consistency.pause"):
            assert self.call("POST", RESUME, {}).status_code == 200
        if not self.world.p("SELECT 1 FROM consistency.parked_entries WHERE queue = 'investment'"):
            self.world.request("investment", ACCOUNT, txn=False)
            service_of(self.app).poller.trigger()
        self.world.p("UPDATE consistency.drift_checks SET state = 'done', finished_at = now() WHERE state = 'running'")
        if target.path == RESUME:
            assert self.call("POST", PAUSE, {"reason": "arranged"}).status_code == 200

    def call(self, method: str, url: str, body: Any = None, data: bytes | None = None) -> Any:
        """Call the API with the token, with a JSON body (`body` as JSON, or `data` as sent) when given."""
        if data is not None:
            return self.client.open(url, method=method, headers=AUTH, data=data, content_type="application/json")
        return self.client.open(url, method=method, headers=AUTH, json=body)

    def url_and_body(self, target: Target, text: str, raw: bool) -> tuple[str, bytes | None]:
        """The request of a valid call of the operation, but for the text put in the target's place."""
        parameters = target.operation.get("parameters", [])
        path = {p["name"]: str(valid(p["schema"])) for p in parameters if p["in"] == "path"}
        if "queue_id" in path:  # act on an entry that is parked
            parked = self.world.p("SELECT min(queue_id) FROM consistency.parked_entries WHERE queue = 'investment'")
            path.update(queue="investment", queue_id=str(parked[0][0]))
        query = {p["name"]: str(valid(p["schema"])) for p in parameters if p["in"] == "query" and p["required"]}
        schema = body_schema(target.operation)
        body = None if schema is None else valid(schema)
        if target.where == "body":
            body = placed(body, target.name, text)
        else:
            (path if target.where == "path" else query)[target.name] = text
        url = target.path.format_map({name: escaped(value) for name, value in path.items()})
        if query:
            url += "?" + "&".join(f"{escaped(name)}={escaped(value)}" for name, value in query.items())
        if body is None:
            return url, None
        # Lone surrogates go either as JSON escapes ("\ud800") or as their raw UTF-8 bytes (b"\xed\xa0\x80").
        raw_json = json.dumps(body, ensure_ascii=not raw)
        return url, raw_json.encode("utf-8", "surrogatepass")

    def received(self, target: Target, url: str, text: str) -> tuple[bool, Any]:
        """Whether the URL reaches a view, and the value the app reads in the target's place."""
        if target.where == "body":
            return True, text
        with self.app.test_request_context(url, method=target.method.upper()):
            if request.routing_exception is not None:
                return False, None
            given = request.args if target.where == "query" else request.view_args or {}
            return True, given.get(target.name)

    def last_audit_id(self) -> int:
        """The id of the newest audit record, 0 when there is none."""
        return int(self.world.p("SELECT coalesce(max(id), 0) FROM consistency.audit_log")[0][0])

    def shown_since(self, audit_id: int) -> set[str]:
        """Every string of the audit records written after `audit_id`, read through the API."""
        records = self.call("GET", f"{AUDIT}?limit=1000").get_json()["entries"]
        return strings([record for record in records if record["id"] > audit_id])


def placed(body: Any, dotted: str, text: str) -> dict[str, Any]:
    """A copy of a JSON body with text at a dotted field, objects made on the way where needed."""
    copy = json.loads(json.dumps(body)) if isinstance(body, dict) else {}
    node = copy
    *outer, last = dotted.split(".")
    for name in outer:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[last] = text
    return copy


@pytest.fixture(scope="module")
def stage(pg: str, templates: tuple[str, str]) -> Iterator[Stage]:
    """The app on databases of its own, kept for the module: hypothesis calls it many times over."""
    from consistency_manager_svc import create_app

    names = [postgres.clone(pg, template) for template in templates]
    uris = [postgres.with_database(pg, name) for name in names]
    settings = Settings(queue_db_uri=uris[0], portfolio_db_uri=uris[1], api_token=API_TOKEN, trigger_wait=5.0)
    app = create_app(settings)
    service_of(app).runner.prepare()
    service_of(app).poller.start()  # so that /health answers 200, and a trigger runs as in production
    world = World(*uris)
    yield Stage(app, app.test_client(), world)
    service_of(app).close()
    world.close()
    for name in names:
        postgres.drop(pg, name)


def send(stage: Stage, target: Target, text: str, raw: bool) -> None:
    """Send text in the target's place and check the answer: never 5xx, 400 if unstorable, else kept as sent."""
    stage.arrange(target)
    url, data = stage.url_and_body(target, text, raw)
    routed, received = stage.received(target, url, text)
    before = stage.last_audit_id()
    answer = stage.call(target.method.upper(), url, data=data)
    shown = answer.get_json(silent=True)
    told = f"{target} given {text!r} (raw={raw}): {answer.status_code} {shown}"
    assert answer.status_code < 500, told
    if not routed:  # no route takes it (a '/', or letters for a number): it reached no view
        assert answer.status_code in (308, 404), told  # 308: to the path with '//' merged
        return
    documented(target, answer.status_code, shown, told)
    if isinstance(received, str) and UNSTORABLE.search(received):
        assert answer.status_code == 400, told
        assert shown["field"] == target.name, told
        assert stage.last_audit_id() == before, told
        event("refused: cannot be stored")
    else:
        assert not (answer.status_code == 400 and REFUSED_FOR_CHARACTERS.search(shown["error"])), told
        if answer.status_code < 300 and keeps_text(target.schema) and received.strip():
            event("kept exactly")
            kept = {received, received.strip()}  # a reason is kept without the white space around it
            assert kept & (strings(shown) | stage.shown_since(before)), told
            if target.path == PAUSE:
                assert stage.call("GET", STATUS).get_json()["pause"]["reason"] in kept, told
            if target.path.endswith("/drift-checks"):
                assert stage.call("GET", LATEST_DRIFT_CHECK).get_json()["reason"] in kept, told


def documented(target: Target, status: int, shown: Any, told: str) -> None:
    """Check that the operation's document names the answer's status, and that the answer fits its schema."""
    responses = target.operation["responses"]
    assert str(status) in responses, f"{told}: status not in the document"
    content = responses[str(status)].get("content", {}).get("application/json")
    if content is not None:
        schema = {**content["schema"], "components": openapi_document()["components"]}
        errors = [e.message for e in Draft202012Validator(schema).iter_errors(shown)]
        assert errors == [], f"{told}: {errors[:3]}"


TARGETS = targets()


@pytest.mark.parametrize("target", TARGETS, ids=str)
@settings(max_examples=12, derandomize=True, database=None, deadline=None)
@given(text=HOSTILE, raw=st.booleans())
@example(text="\x00", raw=False)
@example(text="plain\x00text", raw=True)
@example(text="\ud800", raw=False)
@example(text="\ud800", raw=True)
@example(text="x\udfff", raw=True)
@example(text="\u200f", raw=False)
@example(text="😀", raw=True)
@example(text="<script>alert(1)</script>", raw=False)
@example(text="a/", raw=False)
def test_any_text_anywhere_gets_no_5xx_and_unstorable_text_400_naming_the_field(
    stage: Stage, target: Target, text: str, raw: bool
) -> None:
    send(stage, target, text, raw)


def test_every_endpoint_and_field_of_the_document_is_a_target() -> None:
    operations = {(t.method, t.path) for t in TARGETS}
    assert operations == {(method, path) for path, item in openapi_document()["paths"].items() for method in item}
    named = {str(t) for t in TARGETS}
    assert "POST /api/v1/consistency/parked/retry body:filter.account" in named
    assert "GET /api/v1/consistency/journal query:account" in named
    assert "POST /api/v1/consistency/parked/{queue}/{queue_id}/resolve path:queue" in named


@pytest.mark.parametrize("target", [t for t in TARGETS if keeps_text(t.schema)], ids=str)
def test_text_postgresql_can_store_is_kept_exactly_where_it_is_kept(stage: Stage, target: Target) -> None:
    stage.arrange(target)
    before = stage.last_audit_id()
    url, data = stage.url_and_body(target, STORABLE_EXAMPLE, raw=True)
    answer = stage.call(target.method.upper(), url, data=data)
    assert answer.status_code < 300, answer.get_json()
    assert STORABLE_EXAMPLE in strings(answer.get_json()) | stage.shown_since(before)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"reason": "\xed\xa0\x80"}', "reason"),  # a lone surrogate's raw UTF-8 bytes: json.loads lets them in
        (b'{"reason": "\\udfff"}', "reason"),
        (b'{"reason": "x\\u0000"}', "reason"),
        (b'{"reason": "x", "\\u0000": 1}', "\\u0000"),  # a key that cannot be stored is named, escaped
        (b'{"reason": "\xff"}', "body"),  # not UTF-8 at all: not JSON
        (b'{"reason": "x"', "body"),
    ],
)
def test_a_body_postgresql_cannot_store_is_refused_naming_the_field(stage: Stage, data: bytes, field: str) -> None:
    stage.arrange(Target("post", PAUSE, "body", "reason", {}))
    answer = stage.call("POST", PAUSE, data=data)
    assert (answer.status_code, answer.get_json()["field"]) == (400, field)
    assert stage.call("GET", STATUS).get_json()["pause"] is None


def test_a_query_parameter_with_nul_is_refused_naming_it(stage: Stage) -> None:
    answer = stage.call("GET", "/api/v1/consistency/journal?account=1%00")
    assert (answer.status_code, answer.get_json()["field"]) == (400, "account")
