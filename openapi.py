"""The OpenAPI 3 document of the HTTP API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any, get_args

from domain import BASELINE_SOURCES, COUNT_KEYS, TIER_KEYS, Mode, Outcome


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
        "counts": {"type": "object", "additionalProperties": _COUNTS},
        "error": {"type": ["string", "null"]},
    },
}

# The operators' endpoints, by part.
_JOURNAL_PATHS: dict[str, Any] = {}

_ACTION_PATHS: dict[str, Any] = {}

_PAUSE_PATHS: dict[str, Any] = {}

_DRIFT_PATHS: dict[str, Any] = {}

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
                    "poller": {"type": "string", "enum": ["running", "stopped", "stuck"]},
                    "seconds_without_progress": {"type": "number"},
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
                    "reason": _REASON,
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
                "responses": {"200": _json("Liveness", "alive"), "503": _json("Liveness", "poller stopped or stuck")},
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
