"""The HTTP API: each endpoint takes and answers the models of models.py; flask-openapi3 validates the request
from them and writes the OpenAPI document. The gate (gate.py) runs first, for every request."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, current_app, jsonify
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.tag import Tag
from flask_openapi3.types import ResponseDict
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException

import gate
import metrics
import models as m
import tiers
from actions import EntryKey, Refused, Retried, Selection
from adoption import BaselineRequest
from auth import OPERATE, READ, actor
from db import DatabaseError
from domain import QUEUES, InputError
from drift import CheckRunning
from gate import error, needs
from service import INTERNAL_ERROR, Service, service_of

log = logging.getLogger(__name__)

BEARER: list[dict[str, list[str]]] = [{"bearer": []}]  # the security of an endpoint that needs a token
PROBES, STATE, ENTRIES, ACTIONS, CHECKS = (
    Tag(name="probes", description="Liveness, readiness and metrics: no token"),
    Tag(name="state", description="Tier values, watermarks, the last cycle; tier updates and the manual trigger"),
    Tag(name="entries", description="Parked entries, corrections, reused queue rows, the journal and the audit trail"),
    Tag(name="actions", description="Retry and resolve parked entries; pause and resume applying"),
    Tag(name="checks", description="Drift checks and the adoption baseline"),
)
bp = APIBlueprint("consistency", __name__)


def service() -> Service:
    """Return the service this app serves."""
    return service_of(current_app)


def answer(model: type[BaseModel], data: Any, status: int = 200) -> Response:
    """Answer with `data` as `model` says it: checked against the model, in JSON (pydantic writes it)."""
    return Response(model.model_validate(data).model_dump_json(exclude_unset=True), status, mimetype="application/json")


def errors(*codes: int) -> ResponseDict:
    """The error answers an endpoint may give, for its document: 400 always (the gate refuses a bad parameter of
    any endpoint), and the codes given."""
    return dict.fromkeys((400, *codes), m.Error)


def on_invalid(err: ValidationError) -> Response:
    """Answer a request the models refuse: 400 naming the first field at fault."""
    first = err.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or "body"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("model_type", "dict_type"):
        message = "send a JSON object"
    return error(400, f"{field}: {message}", field=field)


@bp.before_request
def gate_every_request() -> Response | None:
    """Let a request through the gate, or answer its refusal."""
    return gate.check()


# Probes and metrics. -------------------------------------------------------------------------------------------


@bp.get("/health", tags=[PROBES], responses={200: m.Liveness, 503: m.Liveness, **errors()})
def health(query: m.NoQuery) -> Response:
    """Liveness: the poller thread runs and progresses, and no process of this replica stalls the lease."""
    state = service().liveness()
    return answer(m.Liveness, state, 200 if state["status"] == "ok" else 503)


@bp.get("/ready", tags=[PROBES], responses={200: m.Readiness, 503: m.Readiness, **errors()})
def ready(query: m.NoQuery) -> Response:
    """Readiness: both databases answer, within 1.5 s, and the state schema is migrated."""
    checks = service().readiness()
    ok = all(result == "ok" for result in checks.values())
    return answer(m.Readiness, {"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503)


@bp.get("/metrics", tags=[PROBES], responses={200: {"description": "Prometheus text format 0.0.4",
         "content": {"text/plain": {"schema": {"type": "string"}}}}, **errors()})  # fmt: skip
def prometheus_metrics(query: m.NoQuery) -> Response:
    """Prometheus metrics of every process of this instance, in the text format 0.0.4."""
    return Response(service().metrics(), mimetype=None, content_type=metrics.CONTENT_TYPE)


@bp.get("/api/v1/openapi.json", tags=[PROBES], responses={200: {"description": "OpenAPI 3.1",
         "content": {"application/json": {"schema": {"type": "object"}}}}, **errors()})  # fmt: skip
def openapi_document(query: m.NoQuery) -> Response:
    """This document."""
    return jsonify(current_app.api_doc)  # type: ignore[attr-defined]  # flask_openapi3.OpenAPI builds it


# State, tier values and the trigger. ---------------------------------------------------------------------------


@bp.get("/api/v1/consistency/status", tags=[STATE], responses={200: m.Status, **errors(503)})
def status(query: m.NoQuery) -> Response:
    """The deployment: tier values, watermarks, counts, the pause, the lease, the backlog, the last cycle; and this
    process."""
    return answer(m.Status, service().status())


@bp.post("/api/v1/consistency/trigger", tags=[STATE], security=BEARER,
         responses={200: m.CycleSummary, 202: m.Running, **errors(401, 403, 409, 503)})  # fmt: skip
@needs(OPERATE)
def trigger(query: m.NoQuery) -> Response:
    """Run a cycle now and return its summary; 202 while it still runs after TRIGGER_WAIT."""
    result = service().trigger()
    if result is None:
        message = "the cycle is still running; follow it at GET /api/v1/consistency/status"
        return answer(m.Running, {"result": "running", "message": message}, 202)
    if result.outcome == "skipped":
        wait = service().settings.trigger_wait
        message = f"another process held the cycle turn for more than {wait:g}s (TRIGGER_WAIT); try again shortly"
        return error(409, message, result="skipped")
    return answer(m.CycleSummary, result.to_json(), 503 if result.outcome == "error" else 200)


@bp.post("/api/v1/consistency/update-tier-values", tags=[STATE], security=BEARER,
         responses={200: m.TiersAnswer, **errors(400, 401, 403, 413, 415, 503)})  # fmt: skip
@needs(OPERATE)
def update_tier_values(query: m.NoQuery, body: m.TierUpdate) -> Response:
    """Change any of the six tier values, all or nothing, with an optional reason; return the values in force."""
    return answer(m.TiersAnswer, {"tiers": service().update_tiers(body.changes(), actor(), body.reason)})


# Parked entries, corrections, reused queue rows, the journal and the audit trail. ------------------------------


@bp.get("/api/v1/consistency/parked", tags=[ENTRIES], security=BEARER,
        responses={200: m.ParkedPage, **errors(400, 401, 503)})  # fmt: skip
@needs(READ)
def parked(query: m.ParkedQuery) -> Response:
    """The parked entries a filter matches (queue, account, a substring of the reason), oldest first, paged."""
    return answer(m.ParkedPage, service().parked_page(query.where(), query.limit, query.after))


@bp.get("/api/v1/consistency/corrections", tags=[ENTRIES], security=BEARER,
        responses={200: m.CorrectionListing, **errors(400, 401, 503)})  # fmt: skip
@needs(READ)
def corrections(query: m.Listing) -> Response:
    """The applied entries whose queue status changed afterwards, newest first."""
    return answer(m.CorrectionListing, service().corrections(query.limit))


@bp.get("/api/v1/consistency/reused-entries", tags=[ENTRIES], security=BEARER,
        responses={200: m.ReusePage, **errors(400, 401, 503)})  # fmt: skip
@needs(READ)
def reused_entries(query: m.Page) -> Response:
    """Queue rows found carrying another transaction than the one applied under their queue_id, newest first."""
    return answer(m.ReusePage, service().reused(query.limit, query.before))


@bp.get("/api/v1/consistency/audit", tags=[ENTRIES], security=BEARER,
        responses={200: m.AuditPage, **errors(400, 401, 503)})  # fmt: skip
@needs(READ)
def audit_trail(query: m.AuditQuery) -> Response:
    """Every operator action, newest first: who, when, what it touched and why; of one action and actor if given."""
    page = service().audit.page(query.limit, query.before, query.action, query.actor)
    return answer(m.AuditPage, {**page, "filter": query.filter()})


@bp.get("/api/v1/consistency/journal", tags=[ENTRIES], security=BEARER,
        responses={200: m.JournalPage, **errors(400, 401, 503)})  # fmt: skip
@needs(READ)
def account_journal(query: m.AccountPage) -> Response:
    """One account's journal records, newest first: why its balances are what they are."""
    return answer(m.JournalPage, service().journal.account(query.account, query.limit, query.before))


@bp.get("/api/v1/consistency/entries/<queue>/<queue_id>", tags=[ENTRIES], security=BEARER,
        responses={200: m.EntryStory, **errors(400, 401, 404, 503)})  # fmt: skip
@needs(READ)
def entry_story(path: m.EntryPath, query: m.NoQuery) -> Response:
    """One entry's whole story: read, parked, applied (before, after, factors), corrected, resolved, reused."""
    known = next(queue for queue in QUEUES if queue.name == path.queue)
    story = service().journal.story(known, path.queue_id)
    if story is None:
        return error(404, f"no {path.queue} entry {path.queue_id} is known to the queue or to the journal")
    return answer(m.EntryStory, story)


@bp.get("/api/v1/consistency/portfolios/<account>", tags=[ENTRIES], security=BEARER,
        responses={200: m.PortfolioAnswer, **errors(400, 401, 404, 503)})  # fmt: skip
@needs(READ)
def portfolio(path: m.AccountPath, query: m.Page) -> Response:
    """Why an account's balances are what they are: the portfolio now, whether it is what the newest completed
    entries left, and its journal records with labelled amounts before and after, newest first."""
    told = service().portfolio(path.account, query.limit, query.before)
    if told is None:
        return error(404, f"account {path.account} has neither a portfolio nor a journal record")
    return answer(m.PortfolioAnswer, told)


# Actions on parked entries; the pause. -------------------------------------------------------------------------


def refused(err: Refused) -> Response:
    """Answer an action that cannot be done as asked, with its own status."""
    return error(err.status, err.message, **err.extra)


def retry_answer(retried: Retried, shown: dict[str, Any]) -> Response:
    """Answer a recorded retry by what its cycle did: 200 when it ran, else 202, 409 or 503 as the trigger does."""
    cycle = retried.cycle
    if cycle is None:
        message = "the retry is recorded; the cycle is still running: follow it at GET /api/v1/consistency/status"
        return answer(m.Running, {"result": "running", "message": message, **shown}, 202)
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


ACTION_ERRORS = errors(400, 401, 403, 404, 409, 413, 415, 503)


@bp.post("/api/v1/consistency/parked/<queue>/<queue_id>/retry", tags=[ACTIONS], security=BEARER,
         responses={200: m.Retried, 202: m.Running, **ACTION_ERRORS})  # fmt: skip
@needs(OPERATE)
def retry_entry(path: m.EntryPath, query: m.NoQuery, body: m.OptionalReason) -> Response:
    """Try one parked entry now: record the retry, run a cycle, and tell what became of the entry."""
    try:
        retried = service().actions.retry(EntryKey(path.queue, path.queue_id), actor(), body.reason)
    except Refused as err:
        return refused(err)
    return retry_answer(retried, {"entry": retried.entries[0]})


@bp.post("/api/v1/consistency/parked/<queue>/<queue_id>/resolve", tags=[ACTIONS], security=BEARER,
         responses={200: m.Resolved, **ACTION_ERRORS})  # fmt: skip
@needs(OPERATE)
def resolve_entry(path: m.EntryPath, query: m.NoQuery, body: m.RequiredReason) -> Response:
    """Dismiss one parked entry for good, with a reason: it leaves the parked list and is never applied."""
    try:
        resolved = service().actions.resolve(EntryKey(path.queue, path.queue_id), actor(), body.reason)
    except Refused as err:
        return refused(err)
    return answer(m.Resolved, {"resolved": resolved})


def selection(body: m.Bulk) -> Selection:
    """The parked entries a bulk action takes."""
    given = body.filter
    return Selection(given.queue, given.parked_reason, given.account, body.limit, body.dry_run)


@bp.post("/api/v1/consistency/parked/retry", tags=[ACTIONS], security=BEARER,
         responses={200: m.BulkAnswer, 202: m.Running, **ACTION_ERRORS})  # fmt: skip
@needs(OPERATE)
def retry_matching(query: m.NoQuery, body: m.Bulk) -> Response:
    """Try the parked entries a filter matches now, up to `limit`; a dry run only lists them."""
    try:
        listing, retried = service().actions.retry_matching(selection(body), actor(), body.reason)
    except Refused as err:
        return refused(err)
    return answer(m.BulkAnswer, listing) if retried is None else retry_answer(retried, listing)


@bp.post("/api/v1/consistency/parked/resolve", tags=[ACTIONS], security=BEARER,
         responses={200: m.BulkAnswer, **ACTION_ERRORS})  # fmt: skip
@needs(OPERATE)
def resolve_matching(query: m.NoQuery, body: m.BulkResolve) -> Response:
    """Dismiss the parked entries a filter matches, up to `limit`, with a reason; a dry run only lists them."""
    try:
        return answer(m.BulkAnswer, service().actions.resolve_matching(selection(body), actor(), body.reason))
    except Refused as err:
        return refused(err)


@bp.post("/api/v1/consistency/pause", tags=[ACTIONS], security=BEARER,
         responses={200: m.Paused, **errors(400, 401, 403, 409, 413, 415, 503)})  # fmt: skip
@needs(OPERATE)
def pause(query: m.NoQuery, body: m.RequiredReason) -> Response:
    """Pause applying in every process and replica, with a reason; 409 when it is paused already."""
    try:
        return answer(m.Paused, {"paused": service().actions.pause(actor(), body.reason).to_json()})
    except Refused as err:
        return refused(err)


@bp.post("/api/v1/consistency/resume", tags=[ACTIONS], security=BEARER,
         responses={200: m.Resumed, **errors(400, 401, 403, 409, 413, 415, 503)})  # fmt: skip
@needs(OPERATE)
def resume(query: m.NoQuery, body: m.OptionalReason) -> Response:
    """End the pause, with an optional reason: every process applies again, this one at once."""
    try:
        return answer(m.Resumed, service().actions.resume(actor(), body.reason))
    except Refused as err:
        return refused(err)


# Drift checks and the baseline. --------------------------------------------------------------------------------

LATEST_DRIFT_CHECK = "/api/v1/consistency/drift-checks/latest"


@bp.post("/api/v1/consistency/drift-checks", tags=[CHECKS], security=BEARER,
         responses={202: m.DriftStarted, **errors(400, 401, 403, 409, 413, 415, 503)})  # fmt: skip
@needs(OPERATE)
def start_drift_check(query: m.NoQuery, body: m.DriftCheckRequest) -> Response:
    """Start a drift check, audited with the token's name and an optional reason; it runs in the background."""
    try:
        check = service().drift.request(actor(), body.reason)
    except CheckRunning as running:
        return error(409, f"{running}; its report: GET {LATEST_DRIFT_CHECK}", id=running.check_id)
    response = answer(m.DriftStarted, check, 202)
    response.headers["Location"] = LATEST_DRIFT_CHECK
    return response


@bp.get("/api/v1/consistency/drift-checks", tags=[CHECKS], security=BEARER,
        responses={200: m.DriftCheckPage, **errors(400, 401, 503)})  # fmt: skip
@needs(READ)
def drift_checks(query: m.Page) -> Response:
    """Every drift check, newest first, each with its findings by kind, paged."""
    return answer(m.DriftCheckPage, service().drift.page(query.limit, query.before))


@bp.get(LATEST_DRIFT_CHECK, tags=[CHECKS], security=BEARER,
        responses={200: m.DriftReport, **errors(400, 401, 404, 503)})  # fmt: skip
@needs(READ)
def latest_drift_check(query: m.NoQuery) -> Response:
    """The newest drift check's report: state, times, rows read, findings by kind and the findings kept."""
    return drift_report(None)


@bp.get("/api/v1/consistency/drift-checks/<check_id>", tags=[CHECKS], security=BEARER,
        responses={200: m.DriftReport, **errors(400, 401, 404, 503)})  # fmt: skip
@needs(READ)
def drift_check(path: m.DriftCheckPath, query: m.NoQuery) -> Response:
    """One drift check's report, by its id."""
    return drift_report(path.check_id)


def drift_report(check_id: int | None) -> Response:
    """Answer a drift check's report (the newest's for None), or 404."""
    report = service().drift.report(check_id)
    if report is None:
        told = "no drift check is stored yet" if check_id is None else f"no drift check {check_id}"
        return error(404, f"{told}; start one with POST /api/v1/consistency/drift-checks")
    return answer(m.DriftReport, report)


@bp.post("/api/v1/consistency/baseline", tags=[CHECKS], security=BEARER,
         responses={200: m.BaselineReport, **errors(400, 401, 403, 413, 415, 503)})  # fmt: skip
@needs(OPERATE)
def baseline(query: m.NoQuery, body: m.BaselineRequest) -> Response:
    """Record the settled entries before a time as applied, moving no money; or count them first (dry run)."""
    wanted = BaselineRequest(body.before, body.reason, body.dry_run)
    return answer(m.BaselineReport, service().adoption.record_baseline(wanted, actor()).to_json())


# Errors the views do not answer themselves. --------------------------------------------------------------------


@bp.app_errorhandler(HTTPException)
def http_error(err: HTTPException) -> Response:
    """Answer HTTP errors (404, 405, 413, ...) in JSON, keeping headers such as Allow."""
    response = error(err.code or 500, err.description or err.name)
    for name, value in err.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


@bp.app_errorhandler(InputError)
def input_error(err: InputError) -> Response:
    """Answer 400 naming the field, for input the service itself finds wrong (a time after queue-db's clock, say)."""
    return error(400, str(err), field=err.field)


@bp.app_errorhandler(DatabaseError)
def database_error(err: DatabaseError) -> Response:
    """Answer 503 when a database cannot serve the request."""
    return error(503, f"{err.database} is unavailable: {err.detail}")


@bp.app_errorhandler(tiers.TiersNotStored)
def state_missing(err: tiers.TiersNotStored) -> Response:
    """Answer 503 while the state schema has not been set up yet."""
    return error(503, f"the service state is not initialised yet: {err}")


@bp.app_errorhandler(Exception)
def internal_error(err: Exception) -> Response:
    """Answer unexpected failures in JSON, with the details in the log only."""
    log.exception("unhandled error")
    return error(500, INTERNAL_ERROR)
