"""The HTTP API: probes, status, parked entries, the manual trigger, tier value updates and the operators' tools."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from functools import wraps
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

import metrics
import tiers
from actions import BULK_FIELDS, EntryKey, Refused, Retried, Selection, only_fields
from adoption import BaselineRequest
from auth import OPERATE, READ, actor, require
from db import DatabaseError
from domain import QUEUES, InputError, Queue
from drift import CheckRunning
from openapi import SPEC
from service import INTERNAL_ERROR, Service, service_of

log = logging.getLogger(__name__)

bp = Blueprint("consistency", __name__)
PARKED_LIMIT_MAX = 1000
REASON_MAX = 500  # characters of an operator's reason
ACCOUNT_MAX = 64  # characters of an account number in a query
QUEUE_ID_MAX = 2**31 - 1  # queue_id is an INTEGER
# PostgreSQL text holds no NUL, and UTF-8 has no lone surrogate, which json.loads lets into a str (as "\ud800" or
# as its raw bytes): psycopg2 could not send it.
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
UNSTORABLE_TEXT = "no NUL character or lone surrogate (U+D800 to U+DFFF): PostgreSQL cannot store them"


def service() -> Service:
    """Return the service this app serves."""
    return service_of(current_app)


def error(status: int, message: str, **extra: Any) -> tuple[Response, int]:
    """Build a JSON error answer."""
    return jsonify({"error": message, **extra}), status


@bp.before_request
def refuse_unstorable_text() -> Any:
    """Refuse text PostgreSQL cannot store, anywhere in a request, with 400 naming its field, before any view runs."""
    for field, text in request_text():
        if UNSTORABLE.search(text):
            err = InputError(shown(field), UNSTORABLE_TEXT)
            return error(400, str(err), field=err.field)
    return None


def request_text() -> Iterator[tuple[str, str]]:
    """Yield every string a request carries with its field: query parameters (names too), path parameters, JSON body."""
    for name, values in request.args.lists():
        yield name, name
        yield from ((name, value) for value in values)
    for name, value in (request.view_args or {}).items():
        if isinstance(value, str):
            yield name, value
    yield from json_text(parsed_body())


def parsed_body() -> Any:
    """Return the JSON body as the views read it, or None: a body that is not JSON is the view's to refuse or ignore."""
    if not request.is_json:
        return None
    try:
        return parse_json(request.get_data(cache=True))
    except (ValueError, RecursionError):  # not JSON, not UTF-8 (UnicodeDecodeError), NaN, too deep
        return None


def json_text(body: Any) -> Iterator[tuple[str, str]]:
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


def shown(field: str) -> str:
    """Name a field in an answer, with any character that cannot be stored in its name escaped."""
    return UNSTORABLE.sub(lambda bad: f"\\u{ord(bad.group()):04x}", field)


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


@bp.get("/api/v1/consistency/reused-entries")
@require(READ)
def reused_entries() -> Any:
    """Queue rows found carrying another transaction than the one applied under their queue_id, newest first, paged."""
    paging = page_arguments()
    if isinstance(paging[0], Response):
        return paging
    limit, before = paging
    return jsonify(service().reused(limit, before))


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


@bp.get("/api/v1/consistency/journal")
@require(READ)
def account_journal() -> Any:
    """One account's journal records, newest first, paged."""
    account = one_argument("account", "")
    if account is None or not account.strip() or len(account) > ACCOUNT_MAX:
        return error(400, f"account: give one account number of at most {ACCOUNT_MAX} characters", field="account")
    paging = page_arguments()
    if isinstance(paging[0], Response):
        return paging
    limit, before = paging
    return jsonify(service().journal.account(account, limit, before))


@bp.get("/api/v1/consistency/entries/<queue>/<int:queue_id>")
@require(READ)
def entry_story(queue: str, queue_id: int) -> Any:
    """The whole story of one queue entry: read, parked, applied, corrected, resolved."""
    known = queue_named(queue)
    story = None if known is None or queue_id > QUEUE_ID_MAX else service().journal.story(known, queue_id)
    if story is None:
        return error(404, f"no {queue} entry {queue_id} is known to the queue or to the journal")
    return jsonify(story)


def queue_named(name: str) -> Queue | None:
    """Return the queue a path names, or None."""
    return next((queue for queue in QUEUES if queue.name == name), None)


# Operator actions on entries: retry and resolve, one or in bulk.


def refusals(view: Callable[..., Any]) -> Callable[..., Any]:
    """Answer an action's bad input with 400 naming the field, and an action refused with its own status."""

    @wraps(view)
    def answered(*args: Any, **kwargs: Any) -> Any:
        try:
            return view(*args, **kwargs)
        except InputError as err:
            return error(400, str(err), field=err.field)
        except Refused as err:
            return error(err.status, err.message, **err.extra)

    return answered


def action_body(allowed: tuple[str, ...], optional: bool) -> Any:
    """Read an action's JSON body, an object with only the `allowed` fields; or answer 4xx (a tuple)."""
    body = json_body(optional)
    if isinstance(body, tuple):
        return body
    if not isinstance(body, dict):
        return error(400, "body: send a JSON object", field="body")
    only_fields(body, allowed)
    return body


def optional_reason(body: dict[str, Any]) -> str | None:
    """Read an action's optional `reason`, or raise InputError."""
    return reason_of(body, required=False)


def required_reason(body: dict[str, Any]) -> str:
    """Read an action's required `reason`, or raise InputError."""
    reason = reason_of(body, required=True)
    if reason is None:  # reason_of has raised already
        raise InputError("reason", "give a reason: a non-empty string")
    return reason


def retry_answer(retried: Retried, shown: dict[str, Any]) -> Any:
    """Answer a recorded retry by what its cycle did: 200 when it ran, else 202, 409 or 503 as the trigger does."""
    cycle = retried.cycle
    if cycle is None:
        message = "the retry is recorded; the cycle is still running: follow it at GET /api/v1/consistency/status"
        return jsonify({"result": "running", "message": message, **shown}), 202
    if cycle.outcome == "skipped":
        wait = service().settings.trigger_wait
        message = f"the retry is recorded, but another process held the cycle turn for more than {wait:g}s "
        return error(409, message + "(TRIGGER_WAIT); every cycle retries every parked entry", result="skipped", **shown)
    if cycle.outcome == "paused":
        return error(409, "the retry is recorded, but applying was paused meanwhile", result="paused", **shown)
    if cycle.outcome == "error":
        message = f"the retry is recorded, but the cycle failed: {cycle.error}"
        return error(503, message, result="error", **shown, cycle=cycle.to_json())
    return jsonify({**shown, "cycle": cycle.to_json()})


@bp.post("/api/v1/consistency/parked/<queue>/<queue_id>/retry")
@require(OPERATE)
@refusals
def retry_entry(queue: str, queue_id: str) -> Any:
    """Try one parked entry now: record the retry, run a cycle, and tell what became of the entry."""
    body = action_body(("reason",), optional=True)
    if isinstance(body, tuple):
        return body
    key = EntryKey.parse(queue, queue_id)
    retried = service().actions.retry(key, actor(), optional_reason(body))
    return retry_answer(retried, {"entry": retried.entries[0]})


@bp.post("/api/v1/consistency/parked/<queue>/<queue_id>/resolve")
@require(OPERATE)
@refusals
def resolve_entry(queue: str, queue_id: str) -> Any:
    """Dismiss one parked entry for good, with a reason: it leaves the parked list and is never applied."""
    body = action_body(("reason",), optional=False)
    if isinstance(body, tuple):
        return body
    key = EntryKey.parse(queue, queue_id)
    return jsonify({"resolved": service().actions.resolve(key, actor(), required_reason(body))})


@bp.post("/api/v1/consistency/parked/retry")
@require(OPERATE)
@refusals
def retry_matching() -> Any:
    """Try the parked entries a filter matches now, up to a limit; a dry run only lists them."""
    body = action_body(BULK_FIELDS, optional=False)
    if isinstance(body, tuple):
        return body
    selection, reason = Selection.parse(body), optional_reason(body)
    listing, retried = service().actions.retry_matching(selection, actor(), reason)
    return jsonify(listing) if retried is None else retry_answer(retried, listing)


@bp.post("/api/v1/consistency/parked/resolve")
@require(OPERATE)
@refusals
def resolve_matching() -> Any:
    """Dismiss the parked entries a filter matches, up to a limit, with a reason; a dry run only lists them."""
    body = action_body(BULK_FIELDS, optional=False)
    if isinstance(body, tuple):
        return body
    selection, reason = Selection.parse(body), required_reason(body)
    return jsonify(service().actions.resolve_matching(selection, actor(), reason))


# The pause.


@bp.post("/api/v1/consistency/pause")
@require(OPERATE)
@refusals
def pause() -> Any:
    """Pause applying in every process and replica, with a reason; 409 when it is paused already."""
    body = action_body(("reason",), optional=False)
    if isinstance(body, tuple):
        return body
    return jsonify({"paused": service().actions.pause(actor(), required_reason(body)).to_json()})


@bp.post("/api/v1/consistency/resume")
@require(OPERATE)
@refusals
def resume() -> Any:
    """End the pause, with an optional reason; 409 when applying is not paused."""
    body = action_body(("reason",), optional=True)
    if isinstance(body, tuple):
        return body
    return jsonify(service().actions.resume(actor(), optional_reason(body)))


# Drift checks.

LATEST_DRIFT_CHECK = "/api/v1/consistency/drift-checks/latest"


@bp.post("/api/v1/consistency/drift-checks")
@require(OPERATE)
def start_drift_check() -> Any:
    """Start a drift check, audited, with an optional reason; it runs in the background."""
    body = json_body(optional=True)
    if isinstance(body, tuple):
        return body
    try:
        reason = drift_check_reason(body)
        check = service().drift.request(actor(), reason)
    except InputError as err:
        return error(400, str(err), field=err.field)
    except CheckRunning as running:
        message = f"{running}; its report: GET {LATEST_DRIFT_CHECK}"
        return error(409, message, id=running.check_id)
    response = jsonify(check)
    response.headers["Location"] = LATEST_DRIFT_CHECK
    return response, 202


def drift_check_reason(body: Any) -> str | None:
    """Read a drift check request's body: a JSON object with an optional `reason` and nothing else."""
    if not isinstance(body, dict):
        raise InputError("body", 'send a JSON object, such as {"reason": "..."}')
    unknown = sorted(set(body) - {"reason"})
    if unknown:
        raise InputError(unknown[0], "unknown key; only `reason` is taken")
    return reason_of(body, required=False)


@bp.get(LATEST_DRIFT_CHECK)
@require(READ)
def latest_drift_check() -> Any:
    """The newest drift check's report: state, times, rows read, findings by kind and the findings kept."""
    report = service().drift.latest()
    if report is None:
        return error(404, "no drift check is stored yet; start one with POST /api/v1/consistency/drift-checks")
    return jsonify(report)


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
