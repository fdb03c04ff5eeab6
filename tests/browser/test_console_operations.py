"""The console's operations pages in a real browser: drift checks, the audit trail, and applying (pause, resume, tier
values). Each page loads from the service alone, under its CSP, with nothing on its console, at a phone's width too;
an operator pauses, resumes and updates the tier values through the forms, as the audit trail then says; a read
token sees no action control and its forged posts change nothing; and hostile text is shown as text."""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from config import Credential
from docs import CSP
from service import service_of
from tests.browser.conftest import sign_in
from tests.tokens import OPERATOR, READER
from tests.world import World

SCRIPT, IMAGE, OVERRIDE = "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "\u202e"
HOSTILE = f"{SCRIPT} {IMAGE} {OVERRIDE}mirrored"
# A token whose name is hostile text: the audit trail and the pause banner show the name of the token that acted.
MALLORY = Credential(HOSTILE, "operate", "mallory-token-0123456789")
MY_PAGES = ["/console/", "/console/drift-checks", "/console/drift-checks/{check}", "/console/audit",
            "/console/applying"]  # fmt: skip
NARROW = {"width": 360, "height": 780}


@pytest.fixture
def app(make_app):
    """The app the browser reaches: it accepts the reader's, the operator's and a hostile-named token."""
    flask_app = make_app(api_tokens=(READER, OPERATOR, MALLORY))
    service_of(flask_app).runner.prepare()
    return flask_app


# Helpers ----------------------------------------------------------------------------------------------------------


def a_check_with_findings(world: World, reason: str = "nightly", account: str = "4000000001") -> int:
    """A finished drift check with a finding of two kinds, one naming an entry and an account; return its id."""
    check = world.p(
        "INSERT INTO consistency.drift_checks (started_by, reason, state, counts, finished_at)"
        " VALUES ('schedule', %s, 'done', '{\"unapplied_entry\": 1, \"unrecorded_transaction\": 1}', now())"
        " RETURNING id",
        (reason,),
    )[0][0]
    world.p(
        "INSERT INTO consistency.drift_findings (check_id, kind, queue, queue_id, uuid, account_number, detail)"
        " VALUES (%s, 'unapplied_entry', 'investment', 17, %s, %s, '{\"status\": \"COMPLETED\"}')",
        (check, f"uuid {reason}", account),
    )
    world.p(
        "INSERT INTO consistency.drift_findings (check_id, kind, txn_id, account_number, detail)"
        " VALUES (%s, 'unrecorded_transaction', gen_random_uuid(), %s, '{\"status\": \"PROCESSED\"}')",
        (check, account),
    )
    return check


def quiet(watched: Any, served: Any) -> None:
    """Assert that the pages asked no other host for anything and wrote no error and opened no dialog."""
    hosts = {urlsplit(url).netloc for url in watched.requests if not url.startswith("data:")}
    assert hosts == {urlsplit(served.base).netloc}, watched.requests
    assert [m for m in watched.console if m.startswith(("error", "pageerror"))] == [], watched.console
    assert watched.dialogs == []


def post_controls(tab: Any) -> int:
    """How many forms of the page post something, but for the sign-out form."""
    return int(tab.locator("form[method=post]:not(.who)").count())


def stored_pause(world: World) -> list[tuple]:
    """The pause stored, as (paused_by, reason), or nothing."""
    return world.p("SELECT paused_by, reason FROM consistency.pause")


def stored_tiers(world: World) -> list[tuple]:
    """The stored tier values, as (tier, pool, market)."""
    return world.p("SELECT tier, pool, market FROM consistency.tier_values ORDER BY tier")


# Every page -------------------------------------------------------------------------------------------------------


def test_each_page_loads_from_the_service_alone_under_its_csp_with_a_quiet_console_at_any_width(
    served, page, world: World
) -> None:
    tab, watched = page
    check = a_check_with_findings(world)
    sign_in(tab, served.base, OPERATOR.token)
    assert "'unsafe-inline'" not in CSP and "default-src 'self'" in CSP and "script-src" not in CSP

    for path in (p.format(check=check) for p in MY_PAGES):
        for size in ({"width": 1280, "height": 800}, NARROW):
            tab.set_viewport_size(size)
            answer = tab.goto(f"{served.base}{path}")
            assert answer is not None and answer.status == 200, path
            assert answer.headers["content-security-policy"] == CSP, path
            assert tab.locator("script, [onerror], [onload], [onclick], [style]").count() == 0, path
            assert tab.evaluate("document.documentElement.scrollWidth") <= size["width"], (path, size)
    quiet(watched, served)


# Pause and resume -------------------------------------------------------------------------------------------------


def test_an_operator_pauses_and_resumes_and_every_page_shows_the_pause_meanwhile(served, page, world: World) -> None:
    tab, watched = page
    check = a_check_with_findings(world)
    sign_in(tab, served.base, OPERATOR.token)
    tab.goto(f"{served.base}/console/applying")

    tab.get_by_label("Reason for the pause").fill("user-portfolio-db maintenance")
    tab.get_by_role("button", name="Pause").click()

    assert tab.get_by_role("heading", name="Applying: paused").is_visible()
    assert "Applying is paused" in tab.locator(".notice").inner_text()
    (paused_at,) = world.p("SELECT paused_at FROM consistency.pause")[0]
    api = tab.context.request.get(f"{served.base}/api/v1/consistency/status").json()
    assert api["applying"] == "paused" and api["pause"]["paused_by"] == "alice"
    for path in (p.format(check=check) for p in MY_PAGES):
        tab.goto(f"{served.base}{path}")
        banner = tab.locator(".banner").inner_text()
        assert "paused by alice" in banner and "user-portfolio-db maintenance" in banner, path
        assert f"since {paused_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" in banner, path
    assert tab.get_by_role("button", name="Pause").count() == 0  # on the applying page, the last one

    tab.get_by_label("Reason for the resume").fill("maintenance done")
    tab.get_by_role("button", name="Resume").click()

    assert tab.get_by_role("heading", name="Applying: running").is_visible()
    assert tab.locator(".banner").count() == 0 and stored_pause(world) == []
    assert tab.context.request.get(f"{served.base}/api/v1/consistency/status").json()["applying"] == "running"
    tab.goto(f"{served.base}/console/audit")
    tab.get_by_label("Actor").fill("alice")
    tab.get_by_role("button", name="Show matching actions").click()
    rows = tab.locator("tbody tr").all_inner_texts()
    assert len(rows) == 2 and "resume" in rows[0] and "maintenance done" in rows[0], rows
    assert "pause" in rows[1] and "user-portfolio-db maintenance" in rows[1] and "alice" in rows[1], rows
    assert world.p("SELECT actor, action, reason FROM consistency.audit_log ORDER BY id") == [
        ("alice", "pause", "user-portfolio-db maintenance"),
        ("alice", "resume", "maintenance done"),
    ]
    quiet(watched, served)


# A read token -----------------------------------------------------------------------------------------------------


def test_a_read_token_sees_no_action_control_and_its_forged_posts_are_refused_changing_nothing(
    served, page, world: World
) -> None:
    tab, watched = page
    check = a_check_with_findings(world)
    tiers_before = stored_tiers(world)
    sign_in(tab, served.base, READER.token)

    for path in (p.format(check=check) for p in MY_PAGES):
        tab.goto(f"{served.base}{path}")
        assert post_controls(tab) == 0, path
        for name in ("Pause", "Resume", "Start a drift check", "Review the update", "Confirm update"):
            assert tab.get_by_role("button", name=name).count() == 0, (path, name)
    csrf = tab.locator("form.who input[name=csrf]").get_attribute("value")  # the session's own: only the role is wrong
    forged = [
        ("/console/applying/pause", {"reason": "forged"}),
        ("/console/drift-checks", {"reason": "forged"}),
        ("/console/applying/tiers", {"TIER1": "5", "version": "3"}),
        ("/console/applying/tiers/review", {"TIER1": "5"}),
    ]
    for path, form in forged:
        answer = tab.context.request.post(f"{served.base}{path}", form={**form, "csrf": csrf}, max_redirects=0)
        assert answer.status == 403 and "has the read role" in answer.text(), (path, answer.status)

    assert stored_pause(world) == [] and stored_tiers(world) == tiers_before
    assert world.p("SELECT count(*) FROM consistency.drift_checks") == [(1,)]  # the one made above
    assert world.p("SELECT count(*) FROM consistency.audit_log") == [(0,)]
    quiet(watched, served)


# Tier values ------------------------------------------------------------------------------------------------------


def test_a_tier_update_is_confirmed_old_against_new_before_it_is_stored_and_audited(served, page, world: World) -> None:
    tab, watched = page
    tiers_before = stored_tiers(world)
    sign_in(tab, served.base, OPERATOR.token)
    tab.goto(f"{served.base}/console/applying")

    tab.get_by_label("TIER1 (now").fill("-5")
    tab.get_by_role("button", name="Review the update").click()
    assert tab.get_by_text("TIER1: must be greater than 0").is_visible()
    assert tab.get_by_label("TIER1 (now").get_attribute("aria-invalid") == "true"
    assert stored_tiers(world) == tiers_before
    refused_form = "error: Failed to load resource: the server responded with a status of 400 (BAD REQUEST)"
    assert watched.console == [refused_form]
    watched.console.clear()  # the page of a refused form is answered 400, which Chromium notes; nothing else may be

    tab.get_by_label("TIER1 (now").fill("")
    tab.get_by_label("TIER1_MV (now").fill("1030000")
    tab.get_by_label("TIER2_MV (now").fill("1990000")
    tab.get_by_label("Reason (optional").fill("quarterly prices")
    tab.get_by_role("button", name="Review the update").click()

    values = tab.locator("table").first.locator("tbody tr").all_inner_texts()
    assert [row.split("\t") for row in values] == [
        ["TIER1_MV", "1000000", "1030000", "+30000"],
        ["TIER2_MV", "2000000", "1990000", "-10000"],
    ]
    deltas = tab.locator("table").nth(1).locator("tbody tr").all_inner_texts()
    assert [row.split("\t") for row in deltas] == [
        ["del_t1_mv", "0", "0.03"], ["del_t2_mv", "0", "-0.005"], ["del_t3_mv", "0", "0"]
    ]  # fmt: skip
    assert stored_tiers(world) == tiers_before and world.p("SELECT count(*) FROM consistency.audit_log") == [(0,)]

    tab.get_by_role("button", name="Confirm update").click()

    assert "Tier values updated: TIER1_MV, TIER2_MV" in tab.locator(".notice").inner_text()
    assert stored_tiers(world)[:2] == [
        (1, Decimal("1000000"), Decimal("1030000")),
        (2, Decimal("2000000"), Decimal("1990000")),
    ]
    assert world.p("SELECT actor, action, reason, detail FROM consistency.audit_log") == [
        ("alice", "update_tier_values", "quarterly prices", {"values": {"TIER1_MV": "1030000", "TIER2_MV": "1990000"}})
    ]
    history = tab.locator("#tiers-history + p + table tbody tr").all_inner_texts()
    assert "2000000 → 1990000" in history[0] and "1000000 → 1030000" in history[1], history
    quiet(watched, served)


# Hostile text -----------------------------------------------------------------------------------------------------


def test_hostile_text_in_every_field_these_pages_show_is_shown_as_text(served, page, world: World) -> None:
    tab, watched = page
    check = a_check_with_findings(world, reason=HOSTILE, account=HOSTILE)
    sign_in(tab, served.base, MALLORY.token)  # the actor the trail and the banner name
    tab.goto(f"{served.base}/console/drift-checks")
    tab.get_by_label("Reason (optional").fill(HOSTILE)
    tab.get_by_role("button", name="Start a drift check").click()
    tab.goto(f"{served.base}/console/applying")
    tab.get_by_label("Reason for the pause").fill(HOSTILE)
    tab.get_by_role("button", name="Pause").click()

    shown = {
        "/console/applying": "main dl",
        "/console/drift-checks": "tbody",
        f"/console/drift-checks/{check}": "main",
        "/console/audit": "tbody",
        f"/console/audit?actor={quote(HOSTILE)}": "main",
        "/console/": ".banner",
    }
    for path, where in shown.items():
        tab.goto(f"{served.base}{path}")
        text = tab.locator(where).first.inner_text()
        assert text.count(HOSTILE) >= (1 if where == ".banner" else 2), (path, text)
        assert HOSTILE in tab.locator(".banner").inner_text(), path
        assert tab.locator("img, script, [onerror]").count() == 0, path
    tab.goto(f"{served.base}/console/audit?actor={quote(HOSTILE)}")
    assert tab.get_by_label("Actor (a token's name)").input_value() == HOSTILE  # the filter, given back as typed
    assert tab.locator("tbody tr").count() == 2  # the drift check and the pause, both by the hostile name
    tab.goto(f"{served.base}/console/drift-checks/{check}")
    assert tab.get_by_role("link", name=HOSTILE).count() == 2  # the account of each finding, linked
    href = tab.get_by_role("link", name=HOSTILE).first.get_attribute("href")
    assert href is not None and href.startswith("/console/accounts?account=%3Cscript%3E")
    assert world.p("SELECT paused_by, reason FROM consistency.pause") == [(HOSTILE, HOSTILE)]
    quiet(watched, served)


# The keyboard ----------------------------------------------------------------------------------------------------

CONTROLS = "a[href], button, input:not([type=hidden]), select, textarea"


def test_the_keyboard_reaches_every_control_of_every_page(served, page, world: World) -> None:
    tab, watched = page
    world.portfolio_for("4000000001")
    world.request("investment", "4000000001")
    parked = world.request("withdrawal", "4000000002", txn=False)
    service_of(served.app).poller.run_once()
    check = a_check_with_findings(world)
    sign_in(tab, served.base, OPERATOR.token)
    pages = [*MY_PAGES, "/console/parked", f"/console/entries/withdrawal/{parked.queue_id}",
             "/console/accounts?account=4000000001"]  # fmt: skip

    for path in pages:
        tab.goto(served.base + path.format(check=check))
        controls = tab.locator(CONTROLS)
        count = controls.count()
        for n in range(count):  # name each control, to know it when it has the focus
            controls.nth(n).evaluate("(element, n) => element.setAttribute('data-control', n)", n)
        reached = set()
        for _ in range(count + 5):
            tab.keyboard.press("Tab")
            reached.add(tab.evaluate("document.activeElement.getAttribute('data-control')"))
        assert {str(n) for n in range(count)} <= reached, (path, count, sorted(reached - {None}))
    quiet(watched, served)
