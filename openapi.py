"""The OpenAPI 3 document of the HTTP API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any, get_args

from domain import BASELINE_SOURCES, COUNT_KEYS, DRIFT_KINDS, QUEUES, TIER_KEYS, Mode, Outcome
from journal import KINDS as JOURNAL_KINDS


def _json(schema: str, description: str) -> dict[str, Any]:
    """A JSON response described by a named schema."""
    reference = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {"application/json": {"schema": reference}}}


def _errors(*codes: int) -> dict[str, Any]:
    """JSON error responses for the given status codes."""
    meaning = {
        400: "bad input; `field` names what is wrong",
        401: "missing or wrong bearer token, or no token configured on the server",
        403: "the token's role does not allow this: actions need the operate role",
        404: "no such entry",
        409: "another process held the cycle turn for longer than TRIGGER_WAIT",
        413: "body larger than 4 KiB",
        415: "body is not JSON",
        503: "a database is unavailable, or the cycle failed",
    }
    return {str(code): _json("Error", meaning[code]) for code in codes}


# gunicorn itself answers a request line over its limit_request_line, in HTML, before the app sees it.
_TOO_LONG = {"414": {"description": "request line over 4094 bytes: gunicorn's own answer, in HTML"}}

# A decimal below 10^12 with at most 8 places; pool values must also be greater than 0.
_DECIMAL_STRING = r"^\s*\+?\d{1,12}(\.\d{0,8})?\s*$"


def _tier_value(low: dict[str, int]) -> dict[str, Any]:
    """A tier value: a JSON number or a numeric string."""
    number = {"type": "number", **low, "exclusiveMaximum": 10**12}
    return {"oneOf": [number, {"type": "string", "pattern": _DECIMAL_STRING}]}


def _before() -> dict[str, Any]:
    """The `before` query parameter of a paged listing: the `next_before` of the page before."""
    return {
        "name": "before",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0, "maximum": 999_999_999_999_999_999},
    }


def _limit() -> dict[str, Any]:
    """The `limit` query parameter of a listing; a new object for each operation, as tools may annotate it."""
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    }


_POOL = _tier_value({"exclusiveMinimum": 0})
_REASON = {"type": "string", "minLength": 1, "maxLength": 500, "pattern": r"\S"}
_READ: list[dict[str, list[str]]] = [{"bearer": []}]  # a token with the read or the operate role
_OPERATE: list[dict[str, list[str]]] = [{"bearer": []}]  # a token with the operate role
_MARKET = _tier_value({"minimum": 0})
_COUNTS = {
    "type": "object",
    "properties": {key: {"type": "integer"} for key in COUNT_KEYS},
}
_SUMMARY = {
    "type": "object",
    "required": ["result", "started_at"],
    "properties": {
        "result": {"type": "string", "enum": list(get_args(Outcome))},
        "started_at": {"type": "string", "format": "date-time"},
        "duration_ms": {"type": "number"},
        "mode": {"type": "string", "enum": list(get_args(Mode))},
        "horizon": {"type": "string", "format": "date-time"},
        "oldest_transaction_s": {"type": ["number", "null"]},
        "prepared_transactions": {"type": "integer"},
        "untracked_sessions": {"type": "integer"},
        "reconciled": {"type": "boolean"},
        "stopped_early": {"type": "boolean"},
        "cycle": {"type": "integer"},
        "counts": {"type": "object", "additionalProperties": _COUNTS},
        "error": {"type": ["string", "null"]},
    },
}

# The operators' endpoints, by part.
_RECORD = {
    "type": "object",
    "required": ["id", "at", "kind"],
    "properties": {
        "id": {"type": "integer"},
        "at": {"type": "string", "format": "date-time"},
        "kind": {"type": "string", "enum": list(JOURNAL_KINDS)},
        "queue": {"type": "string"},
        "queue_id": {"type": "integer"},
        "status": {"type": ["string", "null"]},
        "reason": {"type": ["string", "null"]},
        "attempts": {"type": ["integer", "null"]},
        "before": {"type": ["array", "null"], "items": {"type": "string"}},
        "after": {"type": ["array", "null"], "items": {"type": "string"}},
        "tier_version": {"type": ["integer", "null"]},
        "cycle": {"type": ["integer", "null"]},
        "actor": {"type": ["string", "null"]},
    },
}
_REUSE = {
    "type": "object",
    "required": ["id", "noticed_at", "queue", "queue_id", "earlier_transaction", "portfolio_transaction", "state"],
    "properties": {
        "id": {"type": "integer"},
        "noticed_at": {"type": "string", "format": "date-time"},
        "queue": {"type": "string", "enum": [q.name for q in QUEUES]},
        "queue_id": {"type": "integer"},
        "earlier_transaction": {"type": "string", "format": "uuid"},
        "portfolio_transaction": {"type": ["string", "null"]},
        "uuid": {"type": ["string", "null"]},
        "account_number": {"type": ["string", "null"]},
        "status": {"type": ["string", "null"]},
        "cycle": {"type": ["integer", "null"]},
        "state": {"type": "string", "enum": ["applied", "parked", "resolved", "not applied yet"]},
        "parked_reason": {"type": ["string", "null"]},
    },
}
_QUEUE_PATH = [
    {"name": "queue", "in": "path", "required": True, "schema": {"type": "string", "enum": [q.name for q in QUEUES]}},
    {"name": "queue_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},
]
_JOURNAL_PATHS: dict[str, Any] = {
    "/api/v1/consistency/journal": {
        "get": {
            "summary": "One account's journal records, newest first: why its balances are what they are",
            "security": _READ,
            "parameters": [
                {"name": "account", "in": "query", "required": True, "schema": {"type": "string", "maxLength": 64}},
                _limit(),
                _before(),
            ],
            "responses": {
                "200": {
                    "description": "a page of the account's records",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["account", "entries", "next_before"],
                                "properties": {
                                    "account": {"type": "string"},
                                    "entries": {"type": "array", "items": _RECORD},
                                    "next_before": {"type": ["integer", "null"]},
                                },
                            }
                        }
                    },
                },
                **_errors(400, 401, 403, 503),
                **_TOO_LONG,
            },
        }
    },
    "/api/v1/consistency/entries/{queue}/{queue_id}": {
        "get": {
            "summary": "One entry's whole story: read, parked, applied (before, after, factors), corrected, resolved",
            "security": _READ,
            "parameters": _QUEUE_PATH,
            "responses": {
                "200": {
                    "description": "the entry's story",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["queue", "queue_id", "state", "records"],
                                "properties": {
                                    "queue": {"type": "string"},
                                    "queue_id": {"type": "integer"},
                                    "state": {
                                        "type": "string",
                                        "enum": ["applied", "parked", "resolved", "open", "not applied yet"],
                                    },
                                    "queue_row": {"type": ["object", "null"]},
                                    "ledger": {"type": ["object", "null"]},
                                    "transactions": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["portfolio_transaction", "applied", "carried_now"],
                                            "properties": {
                                                "portfolio_transaction": {"type": ["string", "null"]},
                                                "uuid": {"type": ["string", "null"]},
                                                "applied": {"type": "boolean"},
                                                "carried_now": {"type": "boolean"},
                                            },
                                        },
                                    },
                                    "reuses": {"type": "array", "items": {"type": "object"}},
                                    "parked": {"type": ["object", "null"]},
                                    "resolved": {"type": ["object", "null"]},
                                    "correction": {"type": ["object", "null"]},
                                    "records": {"type": "array", "items": _RECORD},
                                },
                            }
                        }
                    },
                },
                **_errors(401, 403, 404, 503),
                **_TOO_LONG,
            },
        }
    },
}

_QUEUE_NAME = {"type": "string", "enum": [queue.name for queue in QUEUES]}
_FILTER_TEXT = {"type": "string", "minLength": 1, "maxLength": 500, "pattern": r"\S"}
_ENTRY_PATH = [
    {"name": "queue", "in": "path", "required": True, "schema": _QUEUE_NAME},
    {
        "name": "queue_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
    },
]


def _body(required: list[str], **properties: Any) -> dict[str, Any]:
    """A JSON request body of an action: an object with these properties and no others."""
    schema = {"type": "object", "additionalProperties": False, "required": required, "properties": properties}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _answer(description: str, required: list[str], **properties: Any) -> dict[str, Any]:
    """A JSON answer of an action: an object with at least the required properties."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _refused(description: str) -> dict[str, Any]:
    """An action's refusal, as an Error."""
    return _json("Error", description)


_NO_REASON = {"anyOf": [_REASON, {"type": "null"}]}  # an optional reason may be null: none given
_OPTIONAL_REASON = _body([], reason=_NO_REASON) | {"required": False}
_STATE = {
    "type": "object",
    "required": ["queue", "queue_id", "result"],
    "properties": {
        "queue": _QUEUE_NAME,
        "queue_id": {"type": "integer"},
        "result": {"type": "string", "enum": ["applied", "resolved", "parked", "released"]},
        "outcome": {"type": "string"},
        "resolved_by": {"type": "string"},
        "resolved_at": {"type": "string", "format": "date-time"},
        "reason": {"type": "string"},
        "attempts": {"type": "integer"},
    },
}
_BULK = {
    "filter": {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": {"queue": _QUEUE_NAME, "parked_reason": _FILTER_TEXT, "account": _FILTER_TEXT},
    },
    "dry_run": {"type": "boolean", "default": False},
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
}
_BULK_ANSWER = {
    "dry_run": {"type": "boolean"},
    "filter": {"type": "object"},
    "count": {"type": "integer"},
    "more": {"type": "boolean"},
    "entries": {"type": "array", "items": {"type": "object"}},
    "cycle": {"$ref": "#/components/schemas/CycleSummary"},
}
_BULK_KEYS = ["dry_run", "filter", "count", "more", "entries"]
_RETRY_ANSWERS = {
    "202": _json("Running", "the retry is recorded; the cycle is still running after TRIGGER_WAIT"),
    "409": _refused("applying is paused; or the retry is recorded but another process held the turn (TRIGGER_WAIT)"),
    "503": _refused("a database is unavailable, or the retry is recorded and the cycle failed"),
}
_ENTRY_ERRORS = _errors(400, 401, 403, 413, 415) | {"404": _refused("the entry is not parked; `state` says what it is")}

_ACTION_PATHS: dict[str, Any] = {
    "/api/v1/consistency/parked/{queue}/{queue_id}/retry": {
        "post": {
            "summary": "Try a parked entry now: record the retry, run a cycle, and tell what became of the entry",
            "security": _OPERATE,
            "parameters": _ENTRY_PATH,
            "requestBody": _OPTIONAL_REASON,
            "responses": {
                "200": _answer(
                    "the cycle ran: the entry is applied, still parked, or released",
                    ["entry", "cycle"],
                    entry=_STATE,
                    cycle={"$ref": "#/components/schemas/CycleSummary"},
                ),
                **_RETRY_ANSWERS,
                **_ENTRY_ERRORS,
            },
        }
    },
    "/api/v1/consistency/parked/{queue}/{queue_id}/resolve": {
        "post": {
            "summary": "Dismiss a parked entry for good, with a reason: it leaves the parked list and is never applied",
            "security": _OPERATE,
            "parameters": _ENTRY_PATH,
            "requestBody": _body(["reason"], reason=_REASON),
            "responses": {
                "200": _answer("the entry as resolved", ["resolved"], resolved={"type": "object"}),
                "409": _refused("the entry has a ledger record: it was applied"),
                **_ENTRY_ERRORS,
                "503": _refused("a database is unavailable"),
            },
        }
    },
    "/api/v1/consistency/parked/retry": {
        "post": {
            "summary": "Try the parked entries a filter matches now, up to `limit`; a dry run only lists them",
            "security": _OPERATE,
            "requestBody": _body(["filter"], **_BULK, reason=_NO_REASON),
            "responses": {
                "200": _answer(
                    "what was retried (or would be, in a dry run), and where each entry stands after the cycle",
                    _BULK_KEYS,
                    **_BULK_ANSWER,
                ),
                **_RETRY_ANSWERS,
                **_errors(400, 401, 403, 413, 415),
            },
        }
    },
    "/api/v1/consistency/parked/resolve": {
        "post": {
            "summary": "Dismiss the parked entries a filter matches, up to `limit`, with a reason; a dry run only "
            "lists them",
            "security": _OPERATE,
            "requestBody": _body(["filter", "reason"], **_BULK, reason=_REASON),
            "responses": {
                "200": _answer("what was resolved (or would be, in a dry run)", _BULK_KEYS, **_BULK_ANSWER),
                "409": _refused("one of the entries has a ledger record: it was applied; nothing was resolved"),
                **_errors(400, 401, 403, 413, 415, 503),
            },
        }
    },
}

_PAUSE = {
    "type": "object",
    "required": ["paused_by", "reason", "paused_at"],
    "properties": {
        "paused_by": {"type": "string"},
        "reason": {"type": "string"},
        "paused_at": {"type": "string", "format": "date-time"},
    },
}
_PAUSE_PATHS: dict[str, Any] = {
    "/api/v1/consistency/pause": {
        "post": {
            "summary": "Pause applying in every process and replica, with a reason",
            "security": _OPERATE,
            "requestBody": _body(["reason"], reason=_REASON),
            "responses": {
                "200": _answer("applying is paused", ["paused"], paused=_PAUSE),
                "409": _refused("applying is paused already: `pause` shows by whom, since when and why"),
                **_errors(400, 401, 403, 413, 415, 503),
            },
        }
    },
    "/api/v1/consistency/resume": {
        "post": {
            "summary": "End the pause: every process applies again, this one at once",
            "security": _OPERATE,
            "requestBody": _OPTIONAL_REASON,
            "responses": {
                "200": _answer(
                    "the pause that ended, and how long it lasted",
                    ["resumed_by", "pause", "paused_for_s"],
                    resumed_by={"type": "string"},
                    pause=_PAUSE,
                    paused_for_s={"type": "number"},
                ),
                "409": _refused("applying is not paused"),
                **_errors(400, 401, 403, 413, 415, 503),
            },
        }
    },
}

_DRIFT_STATES = ["running", "done", "failed"]
_DRIFT_COUNTS = {
    "type": "object",
    "required": list(DRIFT_KINDS),
    "properties": {kind: {"type": "integer", "minimum": 0} for kind in DRIFT_KINDS},
}
_DRIFT_FINDING = {
    "type": "object",
    "required": ["kind", "queue", "queue_id", "uuid", "txn_id", "account_number", "detail"],
    "properties": {
        "kind": {"type": "string", "enum": list(DRIFT_KINDS)},
        "queue": {"type": ["string", "null"]},
        "queue_id": {"type": ["integer", "null"]},
        "uuid": {"type": ["string", "null"]},
        "txn_id": {"type": ["string", "null"]},
        "account_number": {"type": ["string", "null"]},
        "detail": {"type": "object"},
    },
}
_DRIFT_STARTED = {
    "type": "object",
    "required": ["id", "started_by", "state", "started_at"],
    "properties": {
        "id": {"type": "integer"},
        "started_by": {"type": "string"},
        "state": {"const": "running"},
        "started_at": {"type": "string", "format": "date-time"},
    },
}
_DRIFT_REPORT = {
    "type": "object",
    "required": [
        "id",
        "started_by",
        "reason",
        "state",
        "started_at",
        "finished_at",
        "rows_read",
        "counts",
        "positions",
        "error",
        "findings_kept_per_kind",
        "findings",
    ],
    "properties": {
        "id": {"type": "integer"},
        "started_by": {"type": "string", "description": "the name of the token that started it, or `schedule`"},
        "reason": {"type": ["string", "null"]},
        "state": {"type": "string", "enum": _DRIFT_STATES},
        "started_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "rows_read": {"type": "integer", "minimum": 0},
        "counts": _DRIFT_COUNTS,
        "positions": {"type": "object", "description": "per phase: where the walk goes on, or that it is done"},
        "error": {"type": ["string", "null"]},
        "findings_kept_per_kind": {"type": "integer"},
        "findings": {"type": "array", "items": _DRIFT_FINDING},
    },
}
_DRIFT_BODY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"reason": _NO_REASON},
}


def _drift_response(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A JSON response of a drift check endpoint, described by its inline schema."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_DRIFT_PATHS: dict[str, Any] = {
    "/api/v1/consistency/drift-checks": {
        "post": {
            "summary": "Start a drift check, audited with the token's name and an optional reason; it runs in the "
            "background",
            "security": _OPERATE,
            "requestBody": {"required": False, "content": {"application/json": {"schema": _DRIFT_BODY}}},
            "responses": {
                "202": _drift_response(_DRIFT_STARTED, "the check is stored and starts in the background"),
                "409": _json("Error", "a drift check is already running; `id` names it"),
                **_errors(400, 401, 403, 413, 415, 503),
            },
        }
    },
    "/api/v1/consistency/drift-checks/latest": {
        "get": {
            "summary": "The newest drift check's report: state, times, rows read, findings by kind, the findings kept",
            "security": _READ,
            "responses": {
                "200": _drift_response(_DRIFT_REPORT, "the newest check, running or finished"),
                "404": _json("Error", "no drift check is stored yet"),
                **_errors(401, 503),
                **_TOO_LONG,
            },
        }
    },
}

# A queue's adoption baseline: settled entries updated before it are not applied by this service.
_BASELINE = {
    "type": "object",
    "required": ["updated_at", "queue_id", "source", "set_by", "set_at"],
    "properties": {
        "updated_at": {"type": "string", "format": "date-time"},
        "queue_id": {"type": "integer"},
        "source": {"type": "string", "enum": list(BASELINE_SOURCES)},
        "set_by": {"type": ["string", "null"]},
        "set_at": {"type": "string", "format": "date-time"},
    },
}
# The baseline in force per queue; a queue without one is left out.
_BASELINES = {"type": "object", "additionalProperties": _BASELINE}
_PER_QUEUE = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}

_ADOPTION_PATHS: dict[str, Any] = {
    "/api/v1/consistency/baseline": {
        "post": {
            "summary": "Record the settled entries before a time as applied, moving no money; or count them (dry run)",
            "security": _OPERATE,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["before", "reason", "dry_run"],
                            "additionalProperties": False,
                            "properties": {
                                "before": {"type": "string", "format": "date-time", "maxLength": 64},
                                "reason": _REASON,
                                "dry_run": {"type": "boolean"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "per queue, the entries a dry run would record, or that the run recorded",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["before", "dry_run", "entries", "audit_id", "baseline"],
                                "properties": {
                                    "before": {"type": "string", "format": "date-time"},
                                    "dry_run": {"type": "boolean"},
                                    "entries": _PER_QUEUE,
                                    "audit_id": {"type": ["integer", "null"]},
                                    "baseline": _BASELINES,
                                },
                            }
                        }
                    },
                },
                **_errors(400, 401, 403, 413, 415, 503),
            },
        }
    }
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Consistency Manager Service", "version": "1.0.0"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}, "field": {"type": "string"}, "result": {"type": "string"}},
            },
            "Liveness": {
                "type": "object",
                "required": ["status", "poller"],
                "properties": {
                    "status": {"type": "string", "enum": ["ok", "failing"]},
                    "poller": {"type": "string", "enum": ["running", "stopped", "stuck", "lease-stalled"]},
                    "seconds_without_progress": {"type": "number"},
                    "lease_holder": {"type": "string", "description": "the process of this replica holding the lease"},
                },
            },
            "Readiness": {
                "type": "object",
                "required": ["status", "checks"],
                "properties": {
                    "status": {"type": "string", "enum": ["ready", "not ready"]},
                    "checks": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "Tiers": {
                "type": "object",
                "required": [*TIER_KEYS, "deltas"],
                "properties": {
                    **{key: {"type": "string"} for key in TIER_KEYS},
                    "deltas": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "Status": {
                "type": "object",
                "required": [
                    "tiers",
                    "watermarks",
                    "baseline",
                    "mode",
                    "parked_entries",
                    "corrections",
                    "reused_entries",
                    "pause",
                    "polling_interval",
                    "last_cycle",
                ],
                "properties": {
                    "tiers": {"$ref": "#/components/schemas/Tiers"},
                    "watermarks": {"type": "object"},
                    "baseline": _BASELINES,
                    "mode": {"type": ["string", "null"]},
                    "parked_entries": {"type": "integer"},
                    "corrections": {"type": "integer"},
                    "reused_entries": {"type": "integer"},
                    "pause": {"oneOf": [_PAUSE, {"type": "null"}]},
                    "polling_interval": {"type": "number"},
                    "last_cycle": {"oneOf": [{"$ref": "#/components/schemas/CycleSummary"}, {"type": "null"}]},
                    "this_process": {"type": "object"},
                },
            },
            "CycleSummary": _SUMMARY,
            "Running": {
                "type": "object",
                "required": ["result", "message"],
                "properties": {"result": {"const": "running"}, "message": {"type": "string"}},
            },
            "Listing": {
                "type": "object",
                "required": ["count", "entries"],
                "properties": {"count": {"type": "integer"}, "entries": {"type": "array", "items": {"type": "object"}}},
            },
            "TierUpdate": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    **{key: _MARKET if key.endswith("_MV") else _POOL for key in TIER_KEYS},
                    "reason": _NO_REASON,
                },
            },
            "Page": {
                "type": "object",
                "required": ["entries", "next_before"],
                "properties": {
                    "entries": {"type": "array", "items": {"type": "object"}},
                    "next_before": {"type": ["integer", "null"]},
                },
            },
        },
    },
    "paths": {
        "/health": {
            "get": {
                "summary": "Liveness: the poller thread runs and is not stuck",
                "responses": {
                    "200": _json("Liveness", "alive"),
                    "503": _json("Liveness", "poller stopped or stuck, or a lease held without progress"),
                },
            }
        },
        "/ready": {
            "get": {
                "summary": "Readiness: both databases answer and the state schema is migrated",
                "responses": {"200": _json("Readiness", "ready"), "503": _json("Readiness", "not ready")},
            }
        },
        "/api/v1/consistency/status": {
            "get": {
                "summary": "Tier values and deltas, watermarks, mode, parked and correction counts, and the last cycle",
                "responses": {"200": _json("Status", "the current state"), **_errors(503)},
            }
        },
        "/api/v1/consistency/parked": {
            "get": {
                "summary": "Parked entries, oldest first",
                "security": _READ,
                "parameters": [_limit()],
                "responses": {"200": _json("Listing", "parked entries"), **_errors(400, 401, 503), **_TOO_LONG},
            }
        },
        "/api/v1/consistency/corrections": {
            "get": {
                "summary": "Applied entries whose queue status changed afterwards, newest first",
                "security": _READ,
                "parameters": [_limit()],
                "responses": {"200": _json("Listing", "corrections"), **_errors(400, 401, 503), **_TOO_LONG},
            }
        },
        "/api/v1/consistency/reused-entries": {
            "get": {
                "summary": "Queue rows found carrying another transaction than the one applied under their queue_id "
                "(new entries, as after queue-db was restored from a backup), newest first, with where each stands",
                "security": _READ,
                "parameters": [_limit(), _before()],
                "responses": {
                    "200": {
                        "description": "how many there are, and a page of them",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["count", "entries", "next_before"],
                                    "properties": {
                                        "count": {"type": "integer"},
                                        "entries": {"type": "array", "items": _REUSE},
                                        "next_before": {"type": ["integer", "null"]},
                                    },
                                }
                            }
                        },
                    },
                    **_errors(400, 401, 503),
                    **_TOO_LONG,
                },
            }
        },
        "/api/v1/consistency/audit": {
            "get": {
                "summary": "Every operator action, newest first: actor, time, action, what it touched and why",
                "security": _READ,
                "parameters": [_limit(), _before()],
                "responses": {"200": _json("Page", "operator actions"), **_errors(400, 401, 503), **_TOO_LONG},
            }
        },
        "/api/v1/consistency/trigger": {
            "post": {
                "summary": "Run a cycle now and return its summary",
                "security": _OPERATE,
                "responses": {
                    "200": _json("CycleSummary", "the cycle ran"),
                    "202": _json("Running", "the cycle is still running after TRIGGER_WAIT"),
                    **_errors(401, 403, 409, 503),
                },
            }
        },
        "/api/v1/consistency/update-tier-values": {
            "post": {
                "summary": "Change any of the six tier values, all or nothing, with an optional reason",
                "security": _OPERATE,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TierUpdate"}}},
                },
                "responses": {
                    "200": {
                        "description": "the new values and deltas",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["tiers"],
                                    "properties": {"tiers": {"$ref": "#/components/schemas/Tiers"}},
                                }
                            }
                        },
                    },
                    **_errors(400, 401, 403, 413, 415, 503),
                },
            }
        },
        **_JOURNAL_PATHS,
        **_ACTION_PATHS,
        **_PAUSE_PATHS,
        **_DRIFT_PATHS,
        **_ADOPTION_PATHS,
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics of every process of this instance",
                "responses": {
                    "200": {
                        "description": "Prometheus text format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3", "content": {"application/json": {"schema": {"type": "object"}}}}
                },
            }
        },
    },
}
