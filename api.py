"""The HTTP API: probes, status, parked entries, the manual trigger, tier value updates and the operators' tools."""

from __future__ import annotations

import json
import logging
import re
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

import metrics
import tiers
from adoption import BaselineRequest
from auth import OPERATE, READ, actor, require
from db import DatabaseError
from domain import InputError
from openapi import SPEC
from service import INTERNAL_ERROR, Service, service_of

log = logging.getLogger(__name__)

bp = Blueprint("consistency", __name__)
PARKED_LIMIT_MAX = 1000
REASON_MAX = 500  # characters of an operator's reason


def service() -> Service:
    """Return the service this app serves."""
    return service_of(current_app)


def error(status: int, message: str, **extra: Any) -> tuple[Response, int]:
    """Build a JSON error answer."""
    return jsonify({"error": message, **extra}), status


@bp.get("/health")
def health() -> Any:
    """Liveness: the poller thread runs and is not stuck inside a cycle; never touches a database."""
    state = service().liveness()
    return jsonify(state), 200 if state["status"] == "ok" else 503


@bp.get("/ready")
def ready() -> Any:
    """Readiness: both databases answer and the state schema is migrated."""
    checks = service().readiness()
    ok = all(result == "ok" for result in checks.values())
    return jsonify({"status": "ready" if ok else "not ready", "checks": checks}), 200 if ok else 503


@bp.get("/metrics")
def prometheus_metrics() -> Any:
    """Prometheus metrics of every process of this service instance, in the text format."""
    return Response(service().metrics(), mimetype=None, content_type=metrics.CONTENT_TYPE)


@bp.get("/api/v1/openapi.json")
def openapi_document() -> Any:
    """The OpenAPI 3 document of this API."""
    return jsonify(SPEC)


@bp.get("/api/v1/consistency/status")
def status() -> Any:
    """The tier values and deltas, watermarks, mode, parked count and the last cycle."""
    return jsonify(service().status())


@bp.get("/api/v1/consistency/parked")
@require(READ)
def parked() -> Any:
    """The parked entries, oldest first, with their reasons."""
    limit = listing_limit()
    return bad_limit() if limit is None else jsonify(service().parked(limit))


@bp.get("/api/v1/consistency/corrections")
@require(READ)
def corrections() -> Any:
    """The applied entries whose queue status changed afterwards, newest first."""
    limit = listing_limit()
    return bad_limit() if limit is None else jsonify(service().corrections(limit))


def listing_limit() -> int | None:
    """Read a listing's one `limit` parameter; None when it is repeated or not a whole number in range."""
    raw = one_argument("limit", "100")
    if raw is None or not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= PARKED_LIMIT_MAX:
        return None
    return int(raw)


def one_argument(name: str, default: str) -> str | None:
    """Read a query parameter given at most once; None when it is repeated."""
    given = request.args.getlist(name) or [default]
    return given[0] if len(given) == 1 else None


def page_arguments() -> tuple[int, int | None] | tuple[Response, int]:
    """Read a paged listing's `limit` and `before` (the `next_before` of the page before), or answer 400."""
    limit = listing_limit()
    if limit is None:
        return bad_limit()
    raw = one_argument("before", "")
    # ASCII digits only: str.isdigit() also takes '¹', which int() refuses (found by schemathesis).
    if raw is None or not re.fullmatch(r"[0-9]{0,18}", raw):
        return error(400, "before: must be one whole number, the next_before of the page before", field="before")
    return limit, int(raw) if raw else None


def reason_of(body: Any, required: bool) -> str | None:
    """Read an action's `reason` from its JSON body; raise InputError when it is missing or not text."""
    reason = body.get("reason") if isinstance(body, dict) else None
    if reason is None and not required:
        return None
    if not isinstance(reason, str) or not reason.strip():
        raise InputError("reason", "give a reason: a non-empty string")
    if len(reason) > REASON_MAX:
        raise InputError("reason", f"at most {REASON_MAX} characters")
    return reason.strip()


def bad_limit() -> tuple[Response, int]:
    """Answer a listing whose limit is out of range."""
    return error(400, f"limit: must be one whole number from 1 to {PARKED_LIMIT_MAX}", field="limit")


@bp.get("/api/v1/consistency/audit")
@require(READ)
def audit_trail() -> Any:
    """Every operator action, newest first, paged."""
    paging = page_arguments()
    if isinstance(paging[0], Response):
        return paging
    limit, before = paging
    return jsonify(service().audit.page(limit, before))


@bp.post("/api/v1/consistency/trigger")
@require(OPERATE)
def trigger() -> Any:
    """Run a cycle now and return its summary."""
    result = service().trigger()
    if result is None:
        message = "the cycle is still running; follow it at GET /api/v1/consistency/status"
        return jsonify({"result": "running", "message": message}), 202
    if result.outcome == "skipped":
        wait = service().settings.trigger_wait
        message = f"another process held the cycle turn for more than {wait:g}s (TRIGGER_WAIT); try again shortly"
        return error(409, message, result="skipped")
    return jsonify(result.to_json()), 503 if result.outcome == "error" else 200


@bp.post("/api/v1/consistency/update-tier-values")
@require(OPERATE)
def update_tier_values() -> Any:
    """Change any of the six tier values, all or nothing, with an optional reason; return the new values."""
    body = json_body()
    if isinstance(body, tuple):
        return body
    try:
        reason = reason_of(body, required=False)
        values = {k: v for k, v in body.items() if k != "reason"} if isinstance(body, dict) else body
        changes = tiers.parse_update(values)
    except InputError as err:
        return error(400, str(err), field=err.field)
    return jsonify({"tiers": service().update_tiers(changes, actor(), reason)})


def json_body(optional: bool = False) -> Any:
    """Read the request's JSON body, or answer 415 or 400; an optional body may be empty, read as {}."""
    if optional and not request.get_data(cache=True):
        return {}
    if not request.is_json:
        return error(415, "body: send JSON with Content-Type: application/json", field="body")
    try:
        return parse_json(request.get_data(cache=False))
    except InputError as err:
        return error(400, str(err), field=err.field)
    except (ValueError, RecursionError):
        return error(400, "body: not valid JSON", field="body")


def parse_json(data: bytes) -> Any:
    """Parse a JSON body with numbers kept exact as Decimal, refusing NaN and Infinity."""

    def refuse(constant: str) -> Any:
        raise InputError("body", f"{constant} is not a number")

    return json.loads(data, parse_float=Decimal, parse_int=Decimal, parse_constant=refuse)


# The journal: one account's records and one entry's story.


# Operator actions on entries: retry and resolve, one or in bulk.


# The pause.


# Drift checks.


# Adoption: the baseline.


@bp.post("/api/v1/consistency/baseline")
@require(OPERATE)
def baseline() -> Any:
    """Count (dry run) or record as applied, without moving money, the settled entries before a time, per queue."""
    body = json_body()
    if isinstance(body, tuple):
        return body
    if not isinstance(body, dict):
        return error(400, "body: send a JSON object with before, reason and dry_run", field="body")
    try:
        wanted = BaselineRequest.parse(body, reason_of(body, required=True))
        report = service().adoption.record_baseline(wanted, actor())
    except InputError as err:
        return error(400, str(err), field=err.field)
    return jsonify(report.to_json())


@bp.app_errorhandler(HTTPException)
def http_error(err: HTTPException) -> Any:
    """Answer HTTP errors (404, 405, 413, ...) in JSON, keeping headers such as Allow."""
    response, status = error(err.code or 500, err.description or err.name)
    for name, value in err.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, status


@bp.app_errorhandler(DatabaseError)
def database_error(err: DatabaseError) -> Any:
    """Answer 503 when a database cannot serve the request."""
    return error(503, f"{err.database} is unavailable: {err.detail}")


@bp.app_errorhandler(tiers.TiersNotStored)
def state_missing(err: tiers.TiersNotStored) -> Any:
    """Answer 503 while the state schema has not been set up yet."""
    return error(503, f"the service state is not initialised yet: {err}")


@bp.app_errorhandler(Exception)
def internal_error(err: Exception) -> Any:
    """Answer unexpected failures in JSON, with the details in the log only."""
    log.exception("unhandled error")
    return error(500, INTERNAL_ERROR)
