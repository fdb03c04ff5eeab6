"""Who may call what: named tokens with roles, 401 for account data without a token, 403 for a read token's
action, the actor of every audited action taken from the token used, and tokens that rotate without a restart."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest

import auth
from auth import Tokens, authenticate
from config import API_TOKEN_NAME, ConfigError, Credential, load_settings
from tests.conftest import API_TOKEN
from tests.tokens import OPERATOR, READER, bearer

# A token added by a rotation: its line is as long as READER's, so that a file holding it instead has the same size.
CAROL = Credential("carol", "operate", "carol-token-0123456789ab")

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
        ("bob short-token\n", "API_TOKENS_FILE line 1: the token must be at least 16 characters"),
        ("bob bob-token-0123456789 admin\n", "API_TOKENS_FILE line 1: the role must be one of read, operate"),
        # A token in the name's or the role's place: never quoted either.
        ("bob-token-0123456789 bob\n", "API_TOKENS_FILE line 1: the token must be at least 16 characters"),
        ("bob read bob-token-0123456789\n", "API_TOKENS_FILE line 1: the role must be one of read, operate"),
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


def test_a_tokens_file_that_is_not_utf8_is_refused_at_start(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(b"bob bob-token-0123456789\xff\n")
    with pytest.raises(ConfigError) as raised:
        load_settings({"API_TOKENS_FILE": str(path)})
    assert raised.value.problems == ["API_TOKENS_FILE must be UTF-8 text"]


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
    from tests.document import openapi_document

    filled = {"{queue}": "investment", "{queue_id}": "1"}
    found = []
    for path, methods in openapi_document()["paths"].items():
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


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def lines(*credentials: Credential) -> str:
    """The text of a tokens file that holds these credentials."""
    return "".join(f"{c.name} {c.token} {c.role}\n" for c in credentials)


def write_tokens(path: Path, *credentials: Credential) -> None:
    """Replace a tokens file at once, as an editor's save or `mv` does."""
    new = path.with_name(path.name + ".new")
    new.write_text(lines(*credentials))
    os.replace(new, path)


def test_the_production_bound_is_fifteen_seconds_at_most() -> None:
    assert 0 < auth.CHECK_INTERVAL <= 15


def test_a_change_counts_within_the_check_interval_and_requests_meanwhile_read_nothing(tmp_path, monkeypatch) -> None:
    clock, path = Clock(), tmp_path / "tokens"
    write_tokens(path, READER)
    tokens = Tokens(path=str(path), fixed=(Credential(API_TOKEN_NAME, "operate", API_TOKEN),), clock=clock)
    assert [c.name for c in tokens.current()] == ["dashboard", API_TOKEN_NAME]

    write_tokens(path, CAROL)
    reads = []

    def counted(*args):
        reads.append(args)
        return open(*args)  # auth's own `with` closes it

    monkeypatch.setattr(auth, "open", counted, raising=False)
    clock.advance(auth.CHECK_INTERVAL - 0.001)
    for _ in range(1000):
        assert tokens.current()[0] == READER
    assert reads == []
    clock.advance(0.001)
    assert [c.name for c in tokens.current()] == ["carol", API_TOKEN_NAME]  # API_TOKEN stays
    assert len(reads) == 1


def test_the_swap_of_a_kubernetes_secret_volume_is_picked_up(tmp_path) -> None:
    """kubelet writes a new timestamped folder and swaps the `..data` link to it; `tokens` links through `..data`."""
    first = tmp_path / "..2026_12_07_10_00_00.000000001"
    first.mkdir()
    (first / "tokens").write_text(lines(READER))
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "tokens").symlink_to("..data/tokens")
    clock, link = Clock(), tmp_path / "tokens"
    tokens = Tokens(path=str(link), clock=clock)
    assert READER in tokens.current() and OPERATOR not in tokens.current()
    before = os.lstat(link)

    second = tmp_path / "..2026_12_07_10_05_00.000000002"
    second.mkdir()
    (second / "tokens").write_text(lines(CAROL))
    old = (first / "tokens").stat()
    os.utime(second / "tokens", ns=(old.st_atime_ns, old.st_mtime_ns))
    assert (second / "tokens").stat().st_size == old.st_size  # the same size and time: only the contents tell
    (tmp_path / "..data_tmp").symlink_to(second.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    shutil.rmtree(first)
    assert os.lstat(link).st_ino == before.st_ino and os.lstat(link).st_mtime_ns == before.st_mtime_ns

    clock.advance(auth.CHECK_INTERVAL)
    assert tokens.current() == (CAROL,)


def test_an_edit_in_place_that_keeps_the_size_and_the_time_counts(tmp_path) -> None:
    clock, path = Clock(), tmp_path / "tokens"
    path.write_text(lines(READER))
    old = path.stat()
    tokens = Tokens(path=str(path), clock=clock)
    with open(path, "r+") as file:
        file.write(lines(CAROL))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert path.read_text() == lines(CAROL)
    new = path.stat()
    assert (new.st_size, new.st_ino, new.st_mtime_ns) == (old.st_size, old.st_ino, old.st_mtime_ns)
    clock.advance(auth.CHECK_INTERVAL)
    assert tokens.current() == (CAROL,)


def test_a_bad_file_keeps_the_last_good_tokens_and_is_logged_once_per_version_without_its_contents(
    tmp_path, caplog
) -> None:
    clock, path = Clock(), tmp_path / "tokens"
    write_tokens(path, READER)
    tokens = Tokens(path=str(path), clock=clock)

    def becomes(bad) -> list[str]:
        """Make the file bad in one way, let requests come for a minute; return the ERROR lines logged."""
        caplog.clear()
        bad()
        for _ in range(20):
            clock.advance(auth.CHECK_INTERVAL)
            assert READER in tokens.current() and OPERATOR not in tokens.current()
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    tokens_seen = (READER.token, OPERATOR.token, CAROL.token, "0123456789")
    with caplog.at_level(logging.INFO, logger="auth"):
        # a role unknown, and tokens where the role and the name go
        text = f"{OPERATOR.name} {OPERATOR.token} admin\n{CAROL.name} read {CAROL.token}\n{OPERATOR.token} x\n"
        versions = {
            "invalid": lambda: path.write_text(text),
            "not UTF-8": lambda: path.write_bytes(lines(CAROL).encode() + b"\xff"),
            "gone": path.unlink,
            "a folder": path.mkdir,
        }
        said = {}
        for kind, bad in versions.items():
            (said[kind],) = becomes(bad)
            assert not any(token in said[kind] for token in tokens_seen), kind
        kept = "; the 1 named tokens (0 operate, 1 read) read before stay in force"
        assert said == {
            "invalid": f"API_TOKENS_FILE {path} line 1: the role must be one of read, operate; "
            f"API_TOKENS_FILE {path} line 2: the role must be one of read, operate; "
            f"API_TOKENS_FILE {path} line 3: the token must be at least 16 characters" + kept,
            "not UTF-8": f"API_TOKENS_FILE {path} must be UTF-8 text" + kept,
            "gone": f"API_TOKENS_FILE {path} cannot be read (No such file or directory)" + kept,
            "a folder": f"API_TOKENS_FILE {path} cannot be read (Is a directory)" + kept,
        }

        caplog.clear()
        path.rmdir()
        write_tokens(path, OPERATOR)
        clock.advance(auth.CHECK_INTERVAL)
        assert tokens.current() == (OPERATOR,)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"API_TOKENS_FILE {path} is good again: 1 named tokens (1 operate, 0 read) in force")
    ]


def test_a_token_added_to_the_file_is_let_in_and_one_removed_refused_without_a_restart(
    make_app, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(auth, "CHECK_INTERVAL", 0.2)  # the mechanism of production, its interval shortened
    path = tmp_path / "tokens"
    write_tokens(path, READER, OPERATOR)
    app = make_app(api_tokens_file=str(path))
    from service import service_of

    service_of(app).runner.prepare()
    client = app.test_client()
    parked = "/api/v1/consistency/parked"
    assert [client.get(parked, headers=bearer(c)).status_code for c in (READER, OPERATOR, CAROL)] == [200, 200, 401]

    write_tokens(path, READER, CAROL)  # carol added, alice removed
    changed = time.monotonic()
    while [client.get(parked, headers=bearer(c)).status_code for c in (OPERATOR, CAROL)] != [401, 200]:
        assert time.monotonic() - changed < auth.CHECK_INTERVAL + 1.0, "the change was not picked up in time"
        time.sleep(0.01)
    assert client.get(parked, headers=bearer(READER)).status_code == 200
    assert client.get(parked, headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code == 200

    body = {"TIER2_MV": "1999999", "reason": "rotation check"}
    assert client.post("/api/v1/consistency/update-tier-values", headers=bearer(OPERATOR), json=body).status_code == 401
    assert client.post("/api/v1/consistency/update-tier-values", headers=bearer(CAROL), json=body).status_code == 200
    (newest,) = client.get("/api/v1/consistency/audit?limit=1", headers=bearer(READER)).get_json()["entries"]
    assert (newest["actor"], newest["reason"]) == ("carol", "rotation check")


def test_a_process_no_request_reaches_still_sees_a_removal_before_a_bad_version(
    make_app, tmp_path, monkeypatch
) -> None:
    """alice removed, then the file broken: a process that got no request in between must not keep alice."""
    monkeypatch.setattr(auth, "CHECK_INTERVAL", 0.2)
    path = tmp_path / "tokens"
    write_tokens(path, READER, OPERATOR)
    app = make_app(api_tokens_file=str(path))
    tokens = auth.tokens_of(app)
    assert OPERATOR in tokens.current()

    write_tokens(path, READER)  # alice removed; no request comes
    time.sleep(auth.CHECK_INTERVAL * 4)
    path.write_text("not a token line\n")  # then a version that cannot be used
    time.sleep(auth.CHECK_INTERVAL * 4)
    client = app.test_client()
    assert client.get("/api/v1/consistency/parked", headers=bearer(OPERATOR)).status_code == 401
    assert READER in tokens.current() and OPERATOR not in tokens.current()
