"""The typed HTTP layer: the models validate every request the same way, keep money exact, refuse what they do not
name, and write a document that validates; the operator's reads answer through it."""

from __future__ import annotations

from decimal import Decimal

import pytest
from openapi_spec_validator import validate

from service import service_of
from tests.document import openapi_document
from tests.world import World

ACCOUNT = "1000000001"
TIERS_PATH = "/api/v1/consistency/update-tier-values"


def test_the_served_document_validates_as_openapi_3_1(client) -> None:
    served = client.get("/api/v1/openapi.json").get_json()
    assert served["openapi"].startswith("3.1")
    validate(served)
    assert served == openapi_document()  # the same document wherever it is read


@pytest.mark.parametrize("spelled", ["number", "string"])
def test_tier_values_are_exact_decimals_from_json_never_floats(client, auth, world: World, spelled: str) -> None:
    small, large = "0.00000001", "999999999999.99999999"  # both lose digits as a float
    values = f'"{small}"' if spelled == "string" else small, f'"{large}"' if spelled == "string" else large
    body = f'{{"TIER1": {values[0]}, "TIER2_MV": {values[1]}}}'

    answer = client.post(TIERS_PATH, data=body, content_type="application/json", headers=auth)

    assert answer.status_code == 200, answer.get_json()
    shown = answer.get_json()["tiers"]
    assert (shown["TIER1"], shown["TIER2_MV"]) == (small, large)
    stored = (
        dict(world.p("SELECT tier, pool FROM consistency.tier_values")),
        dict(world.p("SELECT tier, market FROM consistency.tier_values")),
    )
    assert (stored[0][1], stored[1][2]) == (Decimal(small), Decimal(large))


@pytest.mark.parametrize(
    ("method", "url", "field"),
    [
        ("GET", "/api/v1/consistency/audit?kind=resolve", "kind"),
        ("GET", "/api/v1/consistency/parked?acount=1000000001", "acount"),
        ("GET", "/health?verbose=1", "verbose"),
        ("GET", "/metrics?name=x", "name"),
        ("POST", "/api/v1/consistency/pause?reason=x", "reason"),
        ("GET", "/api/v1/consistency/audit?limit=1&limit=2", "limit"),
    ],
)
def test_an_unknown_or_repeated_query_parameter_is_refused_naming_it(client, auth, method, url, field) -> None:
    answer = client.open(url, method=method, headers=auth, json={"reason": "r"} if method == "POST" else None)
    assert answer.status_code == 400
    assert answer.get_json()["field"] == field


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/consistency/entries/investment/-1", "queue_id"),
        ("/api/v1/consistency/entries/investment/abc", "queue_id"),
        ("/api/v1/consistency/entries/savings/1", "queue"),
        ("/api/v1/consistency/drift-checks/0", "check_id"),
        ("/api/v1/consistency/drift-checks/x", "check_id"),
    ],
)
def test_a_bad_path_parameter_is_400_naming_it_like_every_other_field(client, auth, url: str, field: str) -> None:
    answer = client.get(url, headers=auth)
    assert (answer.status_code, answer.get_json()["field"]) == (400, field)


def test_an_oversized_body_is_413_in_json(client, auth) -> None:
    answer = client.post(TIERS_PATH, data=b'{"reason": "' + b"x" * 5000 + b'"}', content_type="application/json",
                         headers=auth)  # fmt: skip
    assert answer.status_code == 413 and answer.is_json and "error" in answer.get_json()


def test_every_drift_check_is_read_newest_first_and_by_id(client, auth, app) -> None:
    drift = service_of(app).drift
    ids = []
    for reason in ("first", "second", "third"):
        ids.append(client.post("/api/v1/consistency/drift-checks", json={"reason": reason}, headers=auth).json["id"])
        drift.run_due()

    first = client.get("/api/v1/consistency/drift-checks?limit=2", headers=auth).get_json()
    rest = client.get(f"/api/v1/consistency/drift-checks?before={first['next_before']}", headers=auth).get_json()
    one = client.get(f"/api/v1/consistency/drift-checks/{ids[1]}", headers=auth).get_json()
    missing = client.get("/api/v1/consistency/drift-checks/999999", headers=auth)

    assert [c["id"] for c in first["entries"] + rest["entries"]] == ids[::-1]
    assert rest["next_before"] is None
    assert {c["state"] for c in first["entries"]} == {"done"} and "reused_entry" in first["entries"][0]["counts"]
    assert (one["id"], one["reason"], one["findings"]) == (ids[1], "second", [])
    assert missing.status_code == 404


def test_parked_entries_are_filtered_as_the_bulk_actions_filter_them_and_paged(client, auth, app, world) -> None:
    world.portfolio_for(ACCOUNT)
    waiting = [world.request("investment", "2000000002", txn=False) for _ in range(3)]  # no portfolio
    world.request("withdrawal", ACCOUNT, txn=False)  # no portfolio transaction
    service_of(app).runner.run()
    url = "/api/v1/consistency/parked?queue=investment&reason=no%20portfolio&limit=2"

    first = client.get(url, headers=auth).get_json()
    rest = client.get(f"{url}&after={first['next_after']}", headers=auth).get_json()
    by_account = client.get(f"/api/v1/consistency/parked?account={ACCOUNT}", headers=auth).get_json()

    assert [e["queue_id"] for e in first["entries"] + rest["entries"]] == [r.queue_id for r in waiting]
    assert first["more"] and not rest["more"]
    assert first["filter"] == {"queue": "investment", "reason": "no portfolio"}
    assert [(e["queue"], e["account_number"]) for e in by_account["entries"]] == [("withdrawal", ACCOUNT)]
    bad = client.get("/api/v1/consistency/parked?after=yesterday", headers=auth)
    assert (bad.status_code, bad.get_json()["field"]) == (400, "after")


def test_a_portfolio_tells_why_its_balance_is_what_it_is(client, auth, app, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    assert client.post(TIERS_PATH, json={"TIER1_MV": "1100000"}, headers=auth).status_code == 200  # kept in history
    world.request("investment", ACCOUNT)
    service_of(app).runner.run()
    url = f"/api/v1/consistency/portfolios/{ACCOUNT}"

    told = client.get(url, headers=auth).get_json()
    world.p(
        "UPDATE user_portfolios SET tier1_value = tier1_value + 1, total_value = total_value + 1 WHERE accountid = %s",
        (ACCOUNT,),
    )
    changed = client.get(url, headers=auth).get_json()
    unknown = client.get("/api/v1/consistency/portfolios/9999999999", headers=auth)

    (record,) = told["entries"]
    assert record["before"]["tier1_value"] == "1000.00" and record["after"]["tier1_value"] == "1100.00"
    assert record["factors"]["tier1_value"] == "1.1"
    assert told["portfolio"]["tier1_value"] == "1100.00"
    assert told["agreement"]["values"]["agreement"] == "equal"
    assert told["agreement"]["allocations"]["agreement"] == "no_record"
    assert changed["agreement"]["values"]["agreement"] == "differs"
    assert changed["agreement"]["values"]["differences"]["tier1_value"] == {"now": "1101.00", "after": "1100.00"}
    assert unknown.status_code == 404


def test_the_audit_trail_filters_by_action_and_by_actor(client, auth, world: World) -> None:
    world.p(
        "INSERT INTO consistency.audit_log (actor, action, target) VALUES "
        "('alice', 'pause', '{}'), ('bob', 'pause', '{}'), ('alice', 'resume', '{}')"
    )
    url = "/api/v1/consistency/audit"

    def shown(query: str) -> list[tuple[str, str]]:
        answer = client.get(f"{url}?{query}", headers=auth)
        assert answer.status_code == 200, answer.get_json()
        return [(record["actor"], record["action"]) for record in answer.get_json()["entries"]]

    assert shown("action=pause") == [("bob", "pause"), ("alice", "pause")]
    assert shown("actor=alice") == [("alice", "resume"), ("alice", "pause")]
    assert shown("action=pause&actor=alice") == [("alice", "pause")]
    both = client.get(f"{url}?action=pause&actor=alice", headers=auth).get_json()["filter"]
    assert both == {"action": "pause", "actor": "alice"}
    refused = client.get(f"{url}?action=delete", headers=auth)
    assert refused.status_code == 400 and refused.get_json()["field"] == "action"


def test_each_request_model_makes_its_schema_once_and_it_is_pydantics_own() -> None:
    from pydantic import BaseModel

    import models

    for model in (models.NoQuery, models.ParkedQuery, models.AuditQuery, models.Page, models.EntryPath):
        fresh = BaseModel.model_json_schema.__func__(model)  # type: ignore[attr-defined]
        assert model.model_json_schema() == fresh
        assert model.model_json_schema() is model.model_json_schema()  # made once: flask-openapi3 asks per request
