"""Who may call what: named tokens with roles, 401 for account data without a token, 403 for a read token's
action, and the actor of every audited action taken from the token used."""

from __future__ import annotations

import pytest

from auth import authenticate
from config import API_TOKEN_NAME, ConfigError, Credential, load_settings
from tests.conftest import API_TOKEN
from tests.tokens import OPERATOR, READER, bearer

ACCOUNT_ENDPOINTS = [
    "/api/v1/consistency/parked",
    "/api/v1/consistency/corrections",
    "/api/v1/consistency/reused-entries",
    "/api/v1/consistency/audit",
    "/api/v1/consistency/journal?account=1000000001",
]


@pytest.fixture
def named(make_app):
    """An app that accepts the reader and the operator, and API_TOKEN."""
    app = make_app(api_tokens=(READER, OPERATOR))
    from service import service_of

    service_of(app).runner.prepare()
    return app.test_client()


def test_a_tokens_file_gives_names_and_roles(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# name token role\n\n{READER.name} {READER.token}\n{OPERATOR.name} {OPERATOR.token} operate\n")
    settings = load_settings({"API_TOKENS_FILE": str(path), "API_TOKEN": API_TOKEN})
    assert settings.credentials == (READER, OPERATOR, Credential(API_TOKEN_NAME, "operate", API_TOKEN))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("bob short-token\n", "API_TOKENS_FILE line 1: the token of 'bob' must be at least 16 characters"),
        ("bob bob-token-0123456789 admin\n", "API_TOKENS_FILE line 1: role must be one of read, operate (got 'admin')"),
        ("\nbob\n", "API_TOKENS_FILE line 2: expected `name token` or `name token role`"),
        ("bob t-0123456789abcdef\nbob u-0123456789abcdef\n", "API_TOKENS_FILE: every token needs a name of its own"),
        ("bob t-0123456789abcdef\neve t-0123456789abcdef\n", "API_TOKENS_FILE: two names share one token"),
    ],
)
def test_a_bad_tokens_file_is_refused_without_showing_a_token(tmp_path, text: str, problem: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings({"API_TOKENS_FILE": str(path)})
    assert raised.value.problems == [problem]
    assert "0123456789" not in str(raised.value)


def test_a_missing_tokens_file_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="API_TOKENS_FILE must name a readable file"):
        load_settings({"API_TOKENS_FILE": str(tmp_path / "absent")})


def test_a_credential_never_shows_its_token() -> None:
    assert READER.token not in repr(READER)
    assert API_TOKEN not in repr(load_settings({"API_TOKEN": API_TOKEN}))


def test_the_token_presented_picks_its_credential() -> None:
    both = [READER, OPERATOR]
    assert authenticate(f"Bearer {OPERATOR.token}", both) == OPERATOR
    assert authenticate(f"bearer  {READER.token} ", both) == READER
    assert authenticate(f"Basic {READER.token}", both) is None
    assert authenticate(f"Bearer {READER.token}x", both) is None
    assert authenticate("", both) is None


@pytest.mark.parametrize("path", ACCOUNT_ENDPOINTS)
def test_account_data_needs_a_token(named, path: str) -> None:
    refused = named.get(path)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    assert named.get(path, headers=bearer(READER)).status_code == 200
    assert named.get(path, headers=bearer(OPERATOR)).status_code == 200


def documented_gets() -> list[tuple[str, bool]]:
    """Every GET of the OpenAPI document, its path filled in, and whether the document says it needs a token."""
    from openapi import SPEC

    filled = {"{queue}": "investment", "{queue_id}": "1"}
    found = []
    for path, methods in SPEC["paths"].items():
        if "get" in methods:
            for name, value in filled.items():
                path = path.replace(name, value)
            found.append((path, bool(methods["get"].get("security"))))
    return found


@pytest.mark.parametrize(("path", "guarded"), documented_gets())
def test_every_get_the_document_guards_needs_a_token_and_no_other_does(named, path: str, guarded: bool) -> None:
    answer = named.get(path, query_string={"account": "1000000001"} if path.endswith("/journal") else None)
    assert (answer.status_code == 401) == guarded, (path, answer.status_code)


@pytest.mark.parametrize("path", ["/ready", "/api/v1/consistency/status", "/metrics", "/api/v1/openapi.json"])
def test_the_probes_metrics_and_status_stay_open_the_poller_not_started(named, path: str) -> None:
    assert named.get(path).status_code == 200


def test_a_read_token_may_not_act(named, world) -> None:
    answer = named.post("/api/v1/consistency/update-tier-values", headers=bearer(READER), json={"TIER1_MV": "5"})
    assert answer.status_code == 403
    assert answer.get_json()["error"] == "the token of dashboard has the read role; this needs operate"
    assert world.p("SELECT count(*) FROM consistency.audit_log") == [(0,)]
    assert world.p("SELECT market FROM consistency.tier_values WHERE tier = 1")[0][0] != 5


def test_a_tier_update_is_audited_under_the_name_of_the_token_used(named) -> None:
    body = {"TIER1_MV": "1100000", "TIER3": 400000, "reason": "month-end prices", "actor": "mallory"}
    refused = named.post("/api/v1/consistency/update-tier-values", headers=bearer(OPERATOR), json=body)
    assert refused.status_code == 400  # the actor comes from the token, never from the body
    assert refused.get_json()["field"] == "actor"

    del body["actor"]
    assert named.post("/api/v1/consistency/update-tier-values", headers=bearer(OPERATOR), json=body).status_code == 200
    assert named.post("/api/v1/consistency/update-tier-values", headers=bearer(READER), json=body).status_code == 403
    named.post(
        "/api/v1/consistency/update-tier-values", headers={"Authorization": f"Bearer {API_TOKEN}"}, json={"TIER2": 7}
    )

    page = named.get("/api/v1/consistency/audit?limit=1", headers=bearer(READER)).get_json()
    (newest,) = page["entries"]
    assert (newest["actor"], newest["action"], newest["target"]) == (
        API_TOKEN_NAME,
        "update_tier_values",
        {"tiers": ["TIER2"]},
    )
    assert newest["reason"] is None
    older = named.get(f"/api/v1/consistency/audit?before={page['next_before']}", headers=bearer(READER)).get_json()
    (first,) = older["entries"]
    assert older["next_before"] is None
    assert (first["actor"], first["reason"]) == ("alice", "month-end prices")
    assert first["target"] == {"tiers": ["TIER1_MV", "TIER3"]}
    assert first["detail"] == {"values": {"TIER1_MV": "1100000", "TIER3": "400000"}}
    assert first["id"] < newest["id"] and first["at"] <= newest["at"]


@pytest.mark.parametrize("before", ["x", "-1", "1.5", "\u00b9"])
def test_the_audit_trail_refuses_a_bad_page_position(named, before: str) -> None:
    answer = named.get(f"/api/v1/consistency/audit?before={before}", headers=bearer(READER))
    assert (answer.status_code, answer.get_json()["field"]) == (400, "before")
