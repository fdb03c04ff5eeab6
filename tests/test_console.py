"""The console's sessions and overview, through the Flask client: signing in and out, the cookie, the idle
expiry, a token rotated out, and what the overview shows."""

from __future__ import annotations

import pytest

from config import OPERATE, READ, Credential
from console import COOKIE
from service import service_of
from sessions import digest
from tests.world import World

ALICE = Credential("alice", OPERATE, "alice-token-0123456789")
BOB = Credential("bob", READ, "bob-token-0123456789ab")
PASSWORD = "console-pw-never-shown-9"


@pytest.fixture
def console(make_app):
    """A test client of an app that accepts alice (operate) and bob (read), its state prepared."""
    app = make_app(api_tokens=(ALICE, BOB))
    service_of(app).runner.prepare()
    return app.test_client()


def sign_in(client, credential: Credential) -> str:
    """Sign in with a credential's token; return the session cookie's value."""
    answer = client.post("/console/signin", data={"token": credential.token})
    assert answer.status_code == 303
    cookie = client.get_cookie(COOKIE, path="/console")
    assert cookie is not None
    return str(cookie.value)


def test_signing_in_sets_an_httponly_strict_cookie_and_keeps_only_its_digest(console, world: World) -> None:
    answer = console.post("/console/signin", data={"token": ALICE.token})
    stored = world.p("SELECT id_digest, name, token_digest FROM consistency.console_sessions")
    cookie = console.get_cookie(COOKIE, path="/console")

    header = answer.headers["Set-Cookie"]
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/console" in header
    assert stored == [(digest(cookie.value), "alice", digest(ALICE.token))]
    assert ALICE.token not in str(stored) and cookie.value not in str(stored)
    page = console.get("/console/")
    assert page.status_code == 200 and "Signed in as <strong>alice</strong> (operate)" in page.get_data(as_text=True)


def test_a_wrong_token_opens_no_session_and_a_page_without_one_asks_to_sign_in(console, world: World) -> None:
    refused = console.post("/console/signin", data={"token": "not-a-token-at-all"})
    sent = console.get("/console/?from=a-bookmark")

    assert refused.status_code == 401 and console.get_cookie(COOKIE, path="/console") is None
    assert world.p("SELECT count(*) FROM consistency.console_sessions") == [(0,)]
    assert sent.status_code == 302 and "/console/signin?next=" in sent.headers["Location"]


def test_a_session_ends_at_sign_out_after_the_idle_expiry_and_when_its_token_is_refused(
    console, world: World, make_app
) -> None:
    sign_in(console, ALICE)
    console.post("/console/signout")
    assert console.get("/console/").status_code == 302
    assert world.p("SELECT count(*) FROM consistency.console_sessions") == [(0,)]

    sign_in(console, ALICE)
    world.p("UPDATE consistency.console_sessions SET last_seen_at = now() - interval '31 minutes'")
    assert console.get("/console/").status_code == 302  # CONSOLE_IDLE_TIMEOUT is 30 minutes by default
    assert world.p("SELECT count(*) FROM consistency.console_sessions") == [(0,)]

    sign_in(console, BOB)
    rotated = make_app(api_tokens=(ALICE,)).test_client()  # bob's token rotated out of API_TOKENS_FILE
    rotated.set_cookie(COOKIE, console.get_cookie(COOKIE, path="/console").value, path="/console")
    assert rotated.get("/console/").status_code == 302
    assert world.p("SELECT name FROM consistency.console_sessions") == []


def test_the_forms_of_a_session_carry_its_csrf_token(console, world: World) -> None:
    sign_in(console, BOB)
    as_reader = console.post("/console/signout")  # signing out needs no role
    assert as_reader.status_code == 303
    sign_in(console, ALICE)
    page = console.get("/console/").get_data(as_text=True)
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    stored = world.p("SELECT csrf FROM consistency.console_sessions")
    assert stored == [(csrf,)]


def test_every_console_page_carries_the_content_security_policy(console) -> None:
    from docs import CSP

    sign_in(console, ALICE)
    for path in ("/console/", "/console/signin"):
        answer = console.get(path)
        assert answer.headers["Content-Security-Policy"] == CSP
        assert "<script" not in answer.get_data(as_text=True)


def test_the_overview_draws_what_was_applied_this_hour_and_the_last_cycles(console, app_of_console, world) -> None:
    world.portfolio_for("1000000001")
    for _ in range(3):
        world.request("investment", "1000000001")
    world.request("withdrawal", "1000000001", "FAILED")
    service_of(app_of_console).poller.run_once()
    sign_in(console, ALICE)

    page = console.get("/console/").get_data(as_text=True)

    assert page.count('<rect class="investment"') == 1 and page.count('<rect class="withdrawal"') == 1
    assert ": 3 investment</title>" in page and ": 1 withdrawal</title>" in page
    assert "busiest minute: 3" in page
    minutes = world.p("SELECT queue, entries FROM consistency.applied_per_minute ORDER BY queue")
    assert minutes == [("investment", 3), ("withdrawal", 1)]
    cycles = world.p("SELECT count(*) FROM consistency.recent_cycles")
    assert cycles == [(1,)]


@pytest.fixture
def app_of_console(console):
    """The app behind the console client."""
    return console.application


def csrf_of(client) -> str:
    """Read the CSRF token from the overview's forms."""
    page = client.get("/console/").get_data(as_text=True)
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def test_a_notice_shows_only_when_an_action_of_this_session_left_it(console, make_app) -> None:
    sign_in(console, ALICE)
    paused = console.post("/console/applying/pause", data={"csrf": csrf_of(console), "reason": "maintenance"})
    shown = console.get(paused.headers["Location"]).get_data(as_text=True)
    forged = console.get("/console/?notice=Your+token+has+leaked:+sign+in+at+evil.example").get_data(as_text=True)
    other = make_app(api_tokens=(ALICE, BOB)).test_client()
    sign_in(other, ALICE)
    replayed = other.get(paused.headers["Location"]).get_data(as_text=True)

    assert paused.status_code == 303 and "signed=" in paused.headers["Location"]
    assert '<p class="notice" role="status">Applying is paused</p>' in shown
    assert "evil.example" not in forged and 'class="notice"' not in forged
    assert 'class="notice"' not in replayed  # signed for another session


@pytest.mark.parametrize(
    ("method", "path", "form", "status", "title"),
    [
        ("GET", "/console/no-such-page", None, 404, "Not found"),
        ("POST", "/console/no/such/action", {}, 404, "Not found"),
        ("GET", "/console/parked?account=1%00", None, 400, "Not accepted"),
        ("POST", "/console/applying/pause", {"reason": "x" * 5000}, 413, "Request Entity Too Large"),
    ],
)
def test_a_console_request_that_cannot_be_served_is_answered_with_a_page(console, method, path, form, status, title):
    sign_in(console, ALICE)

    answer = console.open(path, method=method, data=form)

    assert answer.status_code == status and answer.mimetype == "text/html"
    assert f"<h1>{title} ({status})</h1>" in answer.get_data(as_text=True)


def test_a_console_page_says_which_database_is_unavailable_and_never_its_password(make_app) -> None:
    unreachable = f"postgresql://svc:{PASSWORD}@127.0.0.1:1/user-portfolio-db"
    client = make_app(portfolio_db_uri=unreachable, api_tokens=(ALICE,)).test_client()
    client.set_cookie(COOKIE, "a-session-of-before-the-outage", path="/console")

    for answer in (client.post("/console/signin", data={"token": ALICE.token}), client.get("/console/")):
        text = answer.get_data(as_text=True)
        assert answer.status_code == 503 and answer.mimetype == "text/html"
        assert "user-portfolio-db is unavailable" in text and PASSWORD not in text


def test_the_console_calls_the_service_layer_and_never_sql() -> None:
    import ast
    from pathlib import Path

    import console

    for path in Path(console.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}  # fmt: skip
        assert not {"psycopg2", "db", "queries"} & modules, path.name
        assert {(m, n) for m, n in names if m in ("db", "queries", "psycopg2")} <= {("db", "DatabaseError")}, path.name
        assert ".portfolio_db" not in path.read_text() and ".queue_db" not in path.read_text(), path.name
