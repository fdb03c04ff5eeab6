"""What every request passes before its view: text PostgreSQL can store, each query parameter once, a JSON body
sent as JSON, and the bearer token its endpoint needs. The models (models.py) check the rest, field by field.

Every refusal is JSON in the API's error envelope, `{"error": ..., "field": ...}`.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import cache
from typing import Any, TypeVar

from flask import Request, Response, current_app, g, jsonify, request
from flask.json.provider import DefaultJSONProvider

import auth

View = TypeVar("View", bound=Callable[..., Any])

# PostgreSQL text holds no NUL, and UTF-8 has no lone surrogate, which json.loads lets into a str (as "\ud800" or
# as its raw bytes): psycopg2 could not send it.
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
UNSTORABLE_TEXT = "no NUL character or lone surrogate (U+D800 to U+DFFF): PostgreSQL cannot store them"
FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")  # the bodies a form posts
# The role each endpoint needs, by view name (auth.READ or auth.OPERATE); an endpoint not named needs none.
ROLES: dict[str, str] = {}


class OrderedJSON(DefaultJSONProvider):
    """JSON answers with their keys in the order the service writes them."""

    sort_keys = False


class ApiRequest(Request):
    """A request whose JSON body keeps every number exact, as Decimal, and refuses NaN and Infinity; an empty body
    reads as an empty object, so that an action's optional body may be left out."""

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        """Return the JSON body, {} when there is none, or None (silent) when it is not JSON."""
        data = self.get_data(cache=True)
        if not data:
            return {}
        try:
            if not (force or self.is_json):
                raise ValueError("not sent as JSON")
            return json.loads(data, parse_float=Decimal, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, NaN, nested too deep
            if silent:
                return None
            return self.on_json_loading_failed(err if isinstance(err, ValueError) else None)


def _refuse_constant(constant: str) -> Any:
    """Refuse NaN, Infinity and -Infinity: they are not numbers an amount may take."""
    raise ValueError(f"{constant} is not a number")


def error(status: int, message: str, **extra: Any) -> Response:
    """Build a JSON error answer."""
    response = jsonify({"error": message, **extra})
    response.status_code = status
    return response


def needs(role: str) -> Callable[[View], View]:
    """Mark a view as needing a bearer token of `role`; the gate checks it before the request is validated."""

    def mark(view: View) -> View:
        ROLES[view.__name__] = role
        return view

    return mark


def check() -> Response | None:
    """Run every check on the request; return the refusal, or None to let it through to its view."""
    req = _current()
    return _unstorable_text(req) or _repeated_parameter(req) or _not_json(req) or _token(req)


def _current() -> Request:
    """Return this request itself, not its proxy: each attribute read through the proxy costs a lookup."""
    current: Request = request._get_current_object()  # type: ignore[attr-defined]
    return current


def _unstorable_text(req: Request) -> Response | None:
    """Refuse text PostgreSQL cannot store, anywhere in the request, naming its field."""
    name = unstorable_field(req)
    return None if name is None else error(400, f"{name}: {UNSTORABLE_TEXT}", field=name)


def unstorable_field(req: Request | None = None) -> str | None:
    """Name the first field of a request (this one by default) that holds text PostgreSQL cannot store; None when
    all of it can be."""
    req = req or _current()
    return next((_shown(field) for field, text in _request_text(req) if UNSTORABLE.search(text)), None)


def _repeated_parameter(req: Request) -> Response | None:
    """Refuse a query parameter given more than once: each takes one value."""
    if not req.query_string:
        return None
    for name, values in req.args.lists():
        if len(values) > 1:
            return error(400, f"{name}: give it once", field=name)
    return None


def _not_json(req: Request) -> Response | None:
    """Refuse a body that is not sent as JSON (415), or none where the endpoint needs one; an empty body is an
    empty object where the endpoint's body is optional."""
    if req.method != "POST":
        return None  # only the actions take a body; any other request's is not read
    given = bool(req.get_data(cache=True))
    if not req.is_json and (given or _needs_body(req.endpoint or "")):
        return error(415, "body: send JSON with Content-Type: application/json", field="body")
    return None


@cache
def _needs_body(endpoint: str) -> bool:
    """Tell whether an endpoint's body model (its view's `body` parameter) has a field it requires."""
    view = current_app.view_functions.get(endpoint)
    hints = typing.get_type_hints(inspect.unwrap(view)) if view is not None else {}
    model = hints.get("body")
    return model is not None and any(field.is_required() for field in model.model_fields.values())


def _token(req: Request) -> Response | None:
    """Refuse a request without the bearer token its endpoint's role needs (401, or 403 for the wrong role)."""
    role = ROLES.get((req.endpoint or "").rpartition(".")[2])
    if role is None:
        return None
    credential, refusal = auth.admit(req.headers.get("Authorization", ""), role)
    if refusal is not None:
        status, message = refusal
        response = error(status, message)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    g.credential = credential
    return None


def _request_text(req: Request) -> Iterator[tuple[str, str]]:
    """Yield every string a request carries with its field: query parameters (names too), path parameters, JSON body."""
    if req.query_string:
        for name, values in req.args.lists():
            yield name, name
            yield from ((name, value) for value in values)
    for name, value in (req.view_args or {}).items():
        if isinstance(value, str):
            yield name, value
    if req.mimetype in FORMS:  # the console's forms; any other request's form is not read
        for name, values in req.form.lists():
            yield name, name
            yield from ((name, value) for value in values)
    if req.method == "POST" and req.is_json:
        yield from _json_text(req.get_json(silent=True))


def _json_text(body: Any) -> Iterator[tuple[str, str]]:
    """Yield every string of a parsed JSON body, keys too, with its field: `filter.account`, `items[0]`, or `body`."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:  # a loop, not recursion: a body nested hundreds deep must not overflow the stack here
        field, value = pending.pop()
        if isinstance(value, str):
            yield field or "body", value
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                inner = f"{field}.{key}" if field else key
                pending += [(inner, item), (inner, key)]
        elif isinstance(value, list):
            pending += reversed([(f"{field or 'body'}[{i}]", item) for i, item in enumerate(value)])


def _shown(field: str) -> str:
    """Name a field in an answer, with any character that cannot be stored in its name escaped."""
    return UNSTORABLE.sub(lambda bad: f"\\u{ord(bad.group()):04x}", field)
