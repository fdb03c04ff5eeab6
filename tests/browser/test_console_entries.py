"""The console's parked entries, an entry's story and an account's page, in a real browser and through the test client:
an operator resolves or retries through plain forms, each action audited under the token's name; an action on
everything a filter matches shows its dry run first; a read token sees no action and its forged posts are refused;
and hostile text in any field shows as text."""

from __future__ import annotations

import re
import struct
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from config import Credential
from service import service_of
from tests.tokens import OPERATOR, READER
from tests.world import World

ACCOUNT, OTHER = "1000000001", "1000000002"
SCRIPT, IMAGE, RTL = "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "\u202e"
HOSTILE = f"{SCRIPT}{RTL}{IMAGE}"  # 56 characters: an account number the console takes (64 at most)
HOSTILE_UUID = f"{IMAGE}{RTL}"  # within the queue's VARCHAR(36)
HOSTILE_STATUS = f"{SCRIPT}{RTL}"


@pytest.fixture
def app(make_app):
    """The app, accepting a named reader and a named operator; the poller not started (the tests run cycles)."""
    flask_app = make_app(api_tokens=(READER, OPERATOR))
    service_of(flask_app).runner.prepare()
    return flask_app


def run_cycle(app) -> None:
    """Run one cycle in this thread."""
    service_of(app).poller.run_once()


def sign_in(tab, served, credential: Credential) -> None:
    """Sign in through the form, as a person does."""
    tab.goto(f"{served.base}/console/signin")
    tab.get_by_label("Bearer token").fill(credential.token)
    tab.get_by_role("button", name="Sign in").click()
    tab.wait_for_url(f"{served.base}/console/")


def visit(tab, url: str) -> str:
    """Open a page, check that it answers 200, and return the text of its main part."""
    answer = tab.goto(url)
    assert answer is not None and answer.status == 200, url
    return tab.inner_text("main")


def assert_clean(watched, served) -> None:
    """Nothing asked of another host, nothing on the console, no dialog opened."""
    hosts = {urlsplit(url).netloc for url in watched.requests if not url.startswith("data:")}
    assert hosts == {urlsplit(served.base).netloc}, watched.requests
    assert [m for m in watched.console if m.startswith(("error", "pageerror"))] == [], watched.console
    assert watched.dialogs == []


def row_of(tab, label: str):
    """The row of the parked entries' table that links to an entry."""
    return tab.get_by_role("row").filter(has=tab.get_by_role("link", name=label, exact=True))


def audit_trail(world: World) -> list[tuple]:
    """Every audit record, oldest first: actor, action, target, reason."""
    return world.p("SELECT actor, action, target, reason FROM consistency.audit_log ORDER BY id")


def selected_target(*entries: Any) -> dict[str, Any]:
    """The audit record's target of an action on the entries selected on a page (all of them still parked)."""
    keys = [{"queue": "investment", "queue_id": entry.queue_id} for entry in entries]
    return {"selected": len(entries), "count": len(entries), "entries": keys}


def parked_ids(world: World) -> set[tuple[str, int]]:
    """The (queue, queue_id) of every parked entry."""
    return set(world.p("SELECT queue, queue_id FROM consistency.parked_entries"))


def page_width(tab) -> int:
    """The width of the whole page as laid out, from a full-page screenshot's PNG header: no script runs."""
    png = tab.screenshot(full_page=True)
    width: int = struct.unpack(">I", png[16:20])[0]
    return width


def test_each_page_loads_for_a_signed_in_operator_from_the_service_alone_and_fits_a_narrow_screen(
    served, page, world: World
) -> None:
    tab, watched = page
    world.portfolio_for(ACCOUNT)
    applied = world.request("investment", ACCOUNT)
    orphan = world.request("withdrawal", OTHER, txn=False)
    run_cycle(served.app)
    sign_in(tab, served, OPERATOR)

    parked = visit(tab, f"{served.base}/console/parked")
    assert f"withdrawal entry {orphan.queue_id}" in parked and f"no portfolio for account {OTHER}" in parked
    story = visit(tab, f"{served.base}/console/entries/investment/{applied.queue_id}")
    assert "Where it stands: applied" in story and "tier1_value" in story and "TIER1_MV" in story
    tab.get_by_label("Account", exact=True).fill(ACCOUNT)  # the header's search form
    tab.get_by_role("button", name="Show account").click()
    tab.wait_for_url(f"{served.base}/console/accounts?account={ACCOUNT}")
    account = tab.inner_text("main")
    assert "equal" in account and f"investment entry {applied.queue_id}" in account
    assert visit(tab, f"{served.base}/console/accounts/{ACCOUNT}") == account
    tab.get_by_role("link", name=f"investment entry {applied.queue_id}").first.click()  # the entry a change came from
    tab.wait_for_url(f"{served.base}/console/entries/investment/{applied.queue_id}")

    tab.set_viewport_size({"width": 360, "height": 740})
    for path in ("parked", f"entries/withdrawal/{orphan.queue_id}", f"accounts?account={ACCOUNT}"):
        visit(tab, f"{served.base}/console/{path}")
        assert page_width(tab) == 360, path  # wide tables scroll inside their own box
    visit(tab, f"{served.base}/console/parked")
    for _ in range(40):  # the keyboard reaches the entry's actions
        tab.keyboard.press("Tab")
        if tab.locator("button:focus").all_inner_texts() == ["Resolve"]:
            break
    else:
        pytest.fail("Tab never reached the Resolve button")
    assert_clean(watched, served)


def test_an_operator_resolves_a_parked_entry_and_it_is_never_applied_afterwards(served, page, world: World) -> None:
    tab, watched = page
    orphan = world.request("investment", ACCOUNT, txn=False)
    kept = world.request("investment", OTHER, txn=False)
    run_cycle(served.app)
    sign_in(tab, served, OPERATOR)
    visit(tab, f"{served.base}/console/parked")

    row = row_of(tab, f"investment entry {orphan.queue_id}")
    row.get_by_role("textbox").fill("refunded by hand, ticket 42")
    row.get_by_role("button", name="Resolve", exact=True).click()

    tab.wait_for_url(re.compile(r".*/console/parked\?notice=.*"))
    notice = f"Resolved investment entry {orphan.queue_id}: it will not be applied."
    assert tab.get_by_role("status").inner_text() == notice
    assert row_of(tab, f"investment entry {orphan.queue_id}").count() == 0
    assert parked_ids(world) == {("investment", kept.queue_id)}
    assert world.p("SELECT resolved_by, reason FROM consistency.resolved_entries") == [
        ("alice", "refunded by hand, ticket 42")
    ]
    ((actor, action, target, reason),) = audit_trail(world)
    assert (actor, action, target, reason) == (
        "alice",
        "resolve",
        {"queue": "investment", "queue_id": orphan.queue_id},
        "refunded by hand, ticket 42",
    )
    story = visit(tab, f"{served.base}/console/entries/investment/{orphan.queue_id}")
    assert "Where it stands: resolved" in story and "refunded by hand, ticket 42" in story

    # The cause goes away, and the queue touches the row again: the same status, then open and settled again.
    world.portfolio_for(ACCOUNT)
    world.transaction_for("investment", ACCOUNT, orphan.uuid)
    world.finish(orphan, "COMPLETED")
    run_cycle(served.app)
    world.finish(orphan, "PENDING")
    run_cycle(served.app)
    world.finish(orphan, "COMPLETED")
    run_cycle(served.app)

    assert world.txn_status(orphan.uuid) == "PENDING"
    assert world.applied() == 0
    assert_clean(watched, served)


def test_a_retry_of_everything_a_filter_matches_shows_its_dry_run_and_acts_only_when_confirmed(
    served, page, world: World
) -> None:
    tab, watched = page
    first = world.request("investment", ACCOUNT, txn=False)
    second = world.request("withdrawal", ACCOUNT, txn=False)
    other = world.request("investment", OTHER, txn=False)
    run_cycle(served.app)
    sign_in(tab, served, OPERATOR)
    visit(tab, f"{served.base}/console/parked")
    tab.get_by_label("Account (exactly)").fill(ACCOUNT)
    tab.get_by_role("button", name="Show matching entries").click()
    tab.wait_for_url(f"{served.base}/console/parked?queue=&account={ACCOUNT}&reason=")

    tab.get_by_role("button", name="Retry all that match").click()

    assert tab.get_by_role("heading", level=1).inner_text() == "Retry 2 parked entries?"
    listed = tab.get_by_role("table").get_by_role("link").all_inner_texts()
    assert listed == [f"investment entry {first.queue_id}", f"withdrawal entry {second.queue_id}"]
    assert audit_trail(world) == []  # the dry run changed nothing
    assert world.p("SELECT count(*) FROM consistency.journal WHERE kind = 'retried'") == [(0,)]
    world.portfolio_for(ACCOUNT)  # the cause goes away: still, nothing applies before the confirm
    world.transaction_for("investment", ACCOUNT, first.uuid)
    world.transaction_for("withdrawal", ACCOUNT, second.uuid)
    assert parked_ids(world) == {("investment", first.queue_id), ("withdrawal", second.queue_id),
                                 ("investment", other.queue_id)}  # fmt: skip

    tab.get_by_role("button", name="Retry these 2 entries").click()

    tab.wait_for_url(re.compile(r".*/console/parked\?.*notice=.*"))
    assert tab.get_by_role("status").inner_text() == "Retried 2 entries that matched: 2 applied."
    assert parked_ids(world) == {("investment", other.queue_id)}
    assert (world.txn_status(first.uuid), world.txn_status(second.uuid)) == ("PROCESSED", "PROCESSED")
    ((actor, action, target, reason),) = audit_trail(world)
    assert (actor, action, reason) == ("alice", "retry", None)
    assert (target["filter"], target["count"]) == ({"account": ACCOUNT}, 2)
    assert_clean(watched, served)


def test_resolving_the_selected_entries_lists_them_first_and_resolves_them_with_the_reason(
    served, page, world: World
) -> None:
    tab, watched = page
    first, second, kept = (world.request("investment", account, txn=False) for account in (ACCOUNT, OTHER, ACCOUNT))
    run_cycle(served.app)
    sign_in(tab, served, OPERATOR)
    visit(tab, f"{served.base}/console/parked")
    for chosen in (first, second):
        tab.get_by_role("checkbox", name=f"Select investment entry {chosen.queue_id}").check()
    tab.get_by_label("Reason for the selected entries (required to resolve)").fill("test accounts")

    tab.get_by_role("button", name="Resolve selected").click()

    assert tab.get_by_role("heading", level=1).inner_text() == "Resolve 2 parked entries?"
    listed = tab.get_by_role("table").get_by_role("link").all_inner_texts()
    assert listed == [f"investment entry {first.queue_id}", f"investment entry {second.queue_id}"]
    assert len(parked_ids(world)) == 3 and audit_trail(world) == []
    assert tab.get_by_label("Reason (required: why these are not to be applied)").input_value() == "test accounts"
    tab.get_by_role("button", name="Resolve these 2 entries").click()

    tab.wait_for_url(re.compile(r".*/console/parked\?.*notice=.*"))
    shown = "Resolved 2 of the 2 selected entries: they will not be applied."
    assert tab.get_by_role("status").inner_text() == shown
    assert parked_ids(world) == {("investment", kept.queue_id)}
    assert audit_trail(world) == [("alice", "resolve", selected_target(first, second), "test accounts")]
    assert_clean(watched, served)


ACTIONS = ["{id}/retry", "{id}/resolve", "selected/retry", "selected/resolve", "matching/retry", "matching/resolve"]


def test_a_read_token_sees_no_action_and_its_forged_posts_are_refused(served, page, world: World) -> None:
    tab, watched = page
    orphan = world.request("investment", ACCOUNT, txn=False)
    run_cycle(served.app)
    sign_in(tab, served, READER)

    for path in ("parked", f"parked?account={ACCOUNT}", f"entries/investment/{orphan.queue_id}",
                 f"accounts?account={ACCOUNT}"):  # fmt: skip
        visit(tab, f"{served.base}/console/{path}")
        assert tab.get_by_role("button").all_inner_texts() == ["Show account", "Sign out", *(
            ["Show matching entries"] if path.startswith("parked") else [])], path  # fmt: skip
        assert tab.get_by_role("checkbox").count() == 0
    csrf = tab.locator("input[name=csrf]").first.get_attribute("value")
    assert csrf
    entry = f"investment:{orphan.queue_id}"
    form = {"csrf": csrf, "reason": "forged", "confirm": "yes", "entry": entry, "account": ACCOUNT, "back": ""}
    for path in ACTIONS:
        url = f"{served.base}/console/parked/" + path.format(id=f"investment/{orphan.queue_id}")
        answer = tab.context.request.post(url, form=form, max_redirects=0)  # with the session's cookie
        assert answer.status == 403, path
        assert f"the token of {READER.name} has the read role" in answer.text()

    assert parked_ids(world) == {("investment", orphan.queue_id)}
    assert audit_trail(world) == []
    assert world.p("SELECT count(*) FROM consistency.journal WHERE kind IN ('retried', 'resolved')") == [(0,)]
    assert_clean(watched, served)


def test_hostile_text_in_every_field_shows_as_text(served, page, world: World) -> None:
    tab, watched = page
    world.q("ALTER TABLE investment_queue ALTER account_number TYPE text, ALTER uuid TYPE text,"
            " DROP CONSTRAINT investment_queue_status_check, ALTER status TYPE text")  # fmt: skip
    by_account = world.request("investment", HOSTILE, txn=False)  # no portfolio for account <that>
    by_uuid = world.finish(world.enqueue("investment", ACCOUNT, HOSTILE_UUID, txn=False))  # not a UUID
    by_status = world.finish(world.enqueue("investment", OTHER, txn=False), HOSTILE_STATUS)  # unknown status
    run_cycle(served.app)
    sign_in(tab, served, OPERATOR)

    parked = visit(tab, f"{served.base}/console/parked")
    assert f"no portfolio for account {HOSTILE}" in parked
    assert HOSTILE_UUID in parked and f"unknown status '{HOSTILE_STATUS}'" in parked
    row = row_of(tab, f"investment entry {by_account.queue_id}")
    row.get_by_role("textbox").fill(f"{HOSTILE} resolved")
    row.get_by_role("button", name="Resolve", exact=True).click()
    tab.wait_for_url(re.compile(r".*notice=.*"))
    row_of(tab, f"investment entry {by_status.queue_id}").get_by_role("button", name="Retry", exact=True).click()
    tab.wait_for_url(re.compile(r".*notice=.*"))
    assert f"still parked: unknown status '{HOSTILE_STATUS}'" in tab.get_by_role("status").inner_text()

    shown = {
        f"entries/investment/{by_account.queue_id}": [HOSTILE, f"{HOSTILE} resolved"],
        f"entries/investment/{by_uuid.queue_id}": [HOSTILE_UUID],
        f"entries/investment/{by_status.queue_id}": [HOSTILE_STATUS],
        f"accounts?account={quote(HOSTILE)}": [f"Account {HOSTILE}", f"{HOSTILE} resolved"],
        f"parked?account={quote(HOSTILE)}": [HOSTILE],  # the filter's caption, and the field's value
    }
    for path, texts in shown.items():
        text = visit(tab, f"{served.base}/console/{path}")
        for expected in texts:
            assert expected in text, (path, expected)
        assert tab.locator("img, script").count() == 0, path
    assert tab.get_by_label("Account (exactly)").input_value() == HOSTILE
    assert world.p("SELECT reason FROM consistency.resolved_entries") == [(f"{HOSTILE} resolved",)]
    tab.get_by_label("Account", exact=True).fill(HOSTILE)  # the header's search form
    tab.get_by_role("button", name="Show account").click()
    assert tab.get_by_role("heading", level=1).inner_text() == f"Account {HOSTILE}"
    assert_clean(watched, served)


# Without a browser: the refusals, and what is not an entry, an account or a page.

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def signed_in(app, credential: Credential):
    """A test client signed in with a credential, and its session's CSRF token."""
    client = app.test_client()
    assert client.post("/console/signin", data={"token": credential.token}).status_code == 303
    match = CSRF.search(client.get("/console/parked").get_data(as_text=True))
    assert match is not None
    return client, match[1]


def test_pages_send_a_browser_without_a_session_to_sign_in_and_actions_refuse_it(app, world: World) -> None:
    client = app.test_client()
    for path in ("/console/parked", "/console/entries/investment/1", "/console/accounts?account=1"):
        answer = client.get(path)
        assert answer.status_code == 302 and answer.headers["Location"].startswith("/console/signin?next="), path
    for path in ACTIONS:
        answer = client.post("/console/parked/" + path.format(id="investment/1"), data={"reason": "x"})
        assert answer.status_code == 401, path


def test_an_action_with_a_wrong_csrf_token_or_a_read_token_is_refused_and_changes_nothing(app, world: World) -> None:
    orphan = world.request("investment", ACCOUNT, txn=False)
    run_cycle(app)
    operator, csrf = signed_in(app, OPERATOR)
    reader, reader_csrf = signed_in(app, READER)
    entry = f"investment:{orphan.queue_id}"
    form = {"reason": "x", "confirm": "yes", "entry": entry, "account": ACCOUNT}

    for path in ACTIONS:
        url = "/console/parked/" + path.format(id=f"investment/{orphan.queue_id}")
        assert operator.post(url, data=form).status_code == 403, path  # no csrf
        assert operator.post(url, data={**form, "csrf": csrf[::-1]}).status_code == 403, path
        assert operator.post(url, data={**form, "csrf": reader_csrf}).status_code == 403, path  # another session's
        assert reader.post(url, data={**form, "csrf": reader_csrf}).status_code == 403, path

    assert parked_ids(world) == {("investment", orphan.queue_id)}
    assert audit_trail(world) == []
    blank = operator.post(f"/console/parked/investment/{orphan.queue_id}/resolve", data={"csrf": csrf, "reason": " "})
    assert blank.status_code == 400 and "needs a reason" in blank.get_data(as_text=True)
    assert parked_ids(world) == {("investment", orphan.queue_id)}


def test_a_confirm_acts_only_on_what_its_dry_run_showed_and_selected_retries_share_one_cycle(app, world: World) -> None:
    first, second = (world.request("investment", ACCOUNT, txn=False) for _ in range(2))
    run_cycle(app)
    client, csrf = signed_in(app, OPERATOR)
    form = {"csrf": csrf, "account": ACCOUNT, "reason": "test accounts"}
    shown = client.post("/console/parked/matching/resolve", data=form).get_data(as_text=True)
    (expect,) = re.findall(r'name="expect" value="([0-9a-f]+)"', shown)
    late = world.request("investment", ACCOUNT, txn=False)
    run_cycle(app)  # a third entry matches now

    stale = client.post("/console/parked/matching/resolve", data={**form, "confirm": "yes", "expect": expect})

    again = stale.get_data(as_text=True)
    assert stale.status_code == 200 and "What matches changed since the list you confirmed" in again
    assert f"investment entry {late.queue_id}<" in again
    assert len(parked_ids(world)) == 3 and audit_trail(world) == []

    world.portfolio_for(ACCOUNT)
    world.transaction_for("investment", ACCOUNT, first.uuid)
    selected = {"csrf": csrf, "entry": [f"investment:{first.queue_id}", f"investment:{second.queue_id}"]}
    listed = client.post("/console/parked/selected/retry", data=selected)
    assert "Retry 2 parked entries?" in listed.get_data(as_text=True) and audit_trail(world) == []
    done = client.post("/console/parked/selected/retry", data={**selected, "confirm": "yes"}, follow_redirects=True)

    text = done.get_data(as_text=True)
    assert f"Retried 2 of the 2 selected entries; investment entry {first.queue_id}: applied (COMPLETED)" in text
    assert f"investment entry {second.queue_id}: still parked: no portfolio transaction" in text
    assert audit_trail(world) == [("alice", "retry", selected_target(first, second), None)]
    assert world.p("SELECT count(*) FROM consistency.journal WHERE kind = 'retried'") == [(2,)]
    assert parked_ids(world) == {("investment", second.queue_id), ("investment", late.queue_id)}


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/console/entries/investment/abc", 400),
        ("/console/entries/deposit/1", 400),
        ("/console/entries/investment/2147483648", 400),
        ("/console/entries/investment/%D9%A3", 400),  # an Arabic-Indic digit is not a queue_id
        ("/console/entries/investment/1?start=x", 400),
        ("/console/entries/investment/1", 404),
        ("/console/accounts?account=", 400),
        ("/console/accounts?account=%20", 400),
        (f"/console/accounts?account={'9' * 65}", 400),
        ("/console/accounts?account=1000000009", 404),
        ("/console/accounts/1000000009", 404),
        ("/console/accounts?account=1000000001&before=x", 400),
        ("/console/parked?queue=deposit", 400),
        ("/console/parked?after=yesterday", 400),
        (f"/console/parked?reason={'x' * 501}", 400),
    ],
)
def test_what_is_not_an_entry_an_account_or_a_page_is_answered_as_a_page(app, path: str, status: int) -> None:
    client, _ = signed_in(app, READER)
    answer = client.get(path)
    assert (answer.status_code, answer.mimetype) == (status, "text/html")


def test_every_page_is_read_a_bounded_page_at_a_time(app, world: World, monkeypatch) -> None:
    monkeypatch.setattr("console.parked.PAGE", 2)
    monkeypatch.setattr("console.accounts.PAGE", 1)
    monkeypatch.setattr("console.entries.RECORDS_PAGE", 1)
    applied, *orphans = [world.request("investment", ACCOUNT, txn=False) for _ in range(4)]
    run_cycle(app)
    world.portfolio_for(ACCOUNT)
    world.transaction_for("investment", ACCOUNT, applied.uuid)
    run_cycle(app)  # the first applies: its story has a parked record, then an applied one
    client, _ = signed_in(app, READER)

    def shown(html: str) -> list[int]:
        return [int(n) for n in re.findall(r">investment entry (\d+)</a>", html)]

    def link(html: str, name: str) -> str:
        (href,) = re.findall(rf'<a href="([^"]+)">{name}</a>', html)
        return href.replace("&amp;", "&")

    first = client.get("/console/parked").get_data(as_text=True)
    second = client.get(link(first, "Next page")).get_data(as_text=True)
    assert (shown(first), shown(second)) == ([o.queue_id for o in orphans[:2]], [orphans[2].queue_id])
    assert "Next page" not in second
    account = client.get(f"/console/accounts?account={ACCOUNT}").get_data(as_text=True)
    older = client.get(link(account, "Older records")).get_data(as_text=True)
    assert "older than record" in older and link(older, "Newest records") == f"/console/accounts?account={ACCOUNT}"
    story = client.get(f"/console/entries/investment/{applied.queue_id}").get_data(as_text=True)
    later = client.get(link(story, "Later records")).get_data(as_text=True)
    assert ("<td>parked</td>" in story, "<td>applied</td>" in story) == (True, False)
    assert ("<td>parked</td>" in later, "<td>applied</td>" in later) == (False, True)
