"""The console's operations pages without a browser: the audit trail's filters and the tier values' history at the
service, each paged and read along an index however long the history; and the console's refusals, its checks of
what a form sends, and what its actions store, through the Flask client."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from flask.testing import FlaskClient

import audit
from config import Credential
from service import Service, service_of
from tests.test_reads import explained, indexes_read, rows_touched, walk
from tests.tokens import OPERATOR, READER
from tests.world import World

ACTORS = ("alice", "bob", "schedule")


# Helpers ----------------------------------------------------------------------------------------------------------


def recorded(svc: Service, actor: str, action: str, reason: str | None = None) -> int:
    """Record an operator action as the service records it; return its id."""
    with svc.portfolio_db.transaction() as cur:
        return audit.record(cur, actor, action, {"applying": "test"}, reason)


def trail(world: World) -> list[tuple[int, str, str]]:
    """The whole audit trail as (id, actor, action), newest first: the oracle of the filters."""
    return world.p("SELECT id, actor, action FROM consistency.audit_log ORDER BY id DESC")


def signed_in(app, credential: Credential) -> tuple[FlaskClient, str]:
    """A client signed in to the console with a credential's token, and its session's CSRF token."""
    client = app.test_client()
    answer = client.post("/console/signin", data={"token": credential.token})
    assert answer.status_code == 303, answer.text
    return client, csrf_of(client.get("/console/applying").text)


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry (the sign-out form's, on every page)."""
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, html
    return found.group(1)


def stored_pause(world: World) -> list[tuple]:
    """The pause stored, as (paused_by, reason), or nothing."""
    return world.p("SELECT paused_by, reason FROM consistency.pause")


def stored_tiers(world: World) -> list[tuple]:
    """The stored tier values, as (tier, pool, market)."""
    return world.p("SELECT tier, pool, market FROM consistency.tier_values ORDER BY tier")


@pytest.fixture
def named(make_app):
    """An app that accepts the reader's and the operator's tokens, its state prepared."""
    app = make_app(api_tokens=(READER, OPERATOR))
    service_of(app).runner.prepare()
    return app


# The audit trail's filters, at the service ------------------------------------------------------------------------


def test_the_audit_trail_filters_by_action_by_actor_and_both_newest_first_a_page_at_a_time(
    svc: Service, world: World
) -> None:
    for n in range(23):
        recorded(svc, ACTORS[n % 3], audit.ACTIONS[n % 4], f"reason {n}")
    everything = trail(world)

    for action in (None, audit.PAUSE, audit.RETRY, audit.BASELINE):
        for actor in (None, "alice", "bob", "nobody"):
            pages = walk(lambda limit, before, a=action, b=actor: svc.audit.page(limit, before, a, b), 3)
            listed = [(e["id"], e["actor"], e["action"]) for p in pages for e in p["entries"]]
            expected = [row for row in everything if action in (None, row[2]) and actor in (None, row[1])]
            assert listed == expected, (action, actor)
            assert all(len(p["entries"]) == 3 for p in pages[:-1])
    assert svc.audit.page(100, None) == svc.audit.page(100, None, None, None)  # the API's call is unchanged
    newest = svc.audit.page(1, None, audit.PAUSE, "bob")["entries"][0]
    assert set(newest) == {"id", "at", "actor", "action", "target", "reason", "detail"}


def test_each_audit_filter_walks_its_index_however_stale_the_statistics(world: World, dbs) -> None:
    world.p("ANALYZE consistency.audit_log")  # while empty: once loaded, the table looks empty to the planner
    world.p(
        "INSERT INTO consistency.audit_log (actor, action, reason)"
        " SELECT CASE WHEN n % 50 = 0 THEN 'rare' ELSE 'alice' END,"
        "        CASE WHEN n <= 5 THEN 'baseline' WHEN n % 2 = 0 THEN 'pause' ELSE 'resume' END, 'r'"
        " FROM generate_series(1, 3000) AS n"
    )
    cases = [
        ({"action": "pause", "actor": None}, "audit_log_action", 11),
        ({"action": None, "actor": "alice"}, "audit_log_actor", 11),
        ({"action": "pause", "actor": "rare"}, "audit_log_actor_action", 11),
        ({"action": None, "actor": None}, "audit_log_pkey", 11),
        ({"action": "baseline", "actor": None}, "audit_log_action", 5),  # only the 5 oldest: no walk of the rest
        ({"action": "resume", "actor": "rare"}, "audit_log_actor_action", 0),  # none at all
    ]
    for before in (None, 2000):
        for filters, index, rows in cases:
            params = {**filters, "before": before, "limit": 11}
            nodes = explained(dbs[1], "list_audit_matching", params, page_plan=True)
            assert indexes_read(nodes) == {index}, (filters, before)
            assert rows_touched(nodes) <= rows, (filters, before)


# The tier values' history -----------------------------------------------------------------------------------------


def test_the_tier_history_is_paged_newest_first_with_the_values_before_and_after(svc: Service, world: World) -> None:
    svc.update_tiers({"TIER1_MV": Decimal("1100000.50")}, "alice", "up")
    svc.update_tiers({"TIER2": Decimal("2500000"), "TIER3_MV": Decimal("0")}, "bob", None)

    pages = walk(lambda limit, before: svc.tier_history(limit, before), 2)

    changes = [c for p in pages for c in p["entries"]]
    stored = world.p("SELECT id FROM consistency.tier_value_history ORDER BY id DESC")
    assert [c["id"] for c in changes] == [row[0] for row in stored] and len(changes) == 6  # 3 seeds and 3 changes
    assert [(c["tier"], c["old_pool"], c["new_pool"], c["old_market"], c["new_market"]) for c in changes[:3]] == [
        (3, "500000", "500000", "500000", "0"),
        (2, "2000000", "2500000", "2000000", "2000000"),
        (1, "1000000", "1000000", "1000000", "1100000.5"),
    ]
    assert [(c["old_pool"], c["old_market"]) for c in changes[3:]] == [(None, None)] * 3  # the seeds
    assert set(changes[0]) == {"id", "changed_at", "tier", "old_pool", "new_pool", "old_market", "new_market"}


def test_the_tier_history_reads_along_its_primary_key(world: World, dbs) -> None:
    world.p("ANALYZE consistency.tier_value_history")
    world.p(
        "INSERT INTO consistency.tier_value_history (tier, new_pool, new_market)"
        " SELECT 1 + n % 3, 1000000, 1000000 + n FROM generate_series(1, 3000) AS n"
    )
    for before in (None, 1500):
        nodes = explained(dbs[1], "list_tier_history", {"before": before, "limit": 21})
        assert indexes_read(nodes) == {"tier_value_history_pkey"} and rows_touched(nodes) == 21


# Refusals ---------------------------------------------------------------------------------------------------------

PAGES = ["/console/drift-checks", "/console/drift-checks/1", "/console/audit", "/console/applying"]
ACTIONS = [
    ("/console/applying/pause", {"reason": "forged"}),
    ("/console/applying/resume", {"reason": "forged"}),
    ("/console/applying/tiers/review", {"TIER1": "5"}),
    ("/console/applying/tiers", {"TIER1": "5", "version": "3"}),
    ("/console/drift-checks", {"reason": "forged"}),
]


def nothing_changed(world: World, tiers_before: list[tuple]) -> None:
    """Assert that no action was stored: no pause, no drift check, no audit record, the same tier values."""
    assert stored_pause(world) == []
    assert world.p("SELECT count(*) FROM consistency.drift_checks") == [(0,)]
    assert world.p("SELECT count(*) FROM consistency.audit_log") == [(0,)]
    assert stored_tiers(world) == tiers_before


@pytest.mark.parametrize("path", PAGES)
def test_a_page_without_a_session_sends_to_the_sign_in(named, path: str) -> None:
    answer = named.test_client().get(path)
    assert answer.status_code == 302 and answer.location.startswith("/console/signin?next=")


@pytest.mark.parametrize(("path", "form"), ACTIONS)
def test_an_action_is_refused_without_a_session_with_a_wrong_csrf_and_for_a_read_token(
    named, world: World, path: str, form: dict
) -> None:
    tiers_before = stored_tiers(world)
    operator, csrf = signed_in(named, OPERATOR)
    reader, reader_csrf = signed_in(named, READER)

    anonymous = named.test_client().post(path, data={**form, "csrf": csrf})
    forged = operator.post(path, data={**form, "csrf": "x" * len(csrf)})
    missing = operator.post(path, data=form)
    foreign = operator.post(path, data={**form, "csrf": reader_csrf})  # another session's token
    read_only = reader.post(path, data={**form, "csrf": reader_csrf})

    assert anonymous.status_code == 401 and "sign in first" in anonymous.text
    for answer in (forged, missing, foreign):
        assert answer.status_code == 403 and "not one of this session" in answer.text
    assert read_only.status_code == 403 and "has the read role" in read_only.text
    nothing_changed(world, tiers_before)


def test_a_read_token_sees_no_action_control(named) -> None:
    reader, _ = signed_in(named, READER)
    operator, _ = signed_in(named, OPERATOR)
    for path in ("/console/drift-checks", "/console/applying"):
        assert 'method="post"' in operator.get(path).text.replace('action="/console/signout"', "")
        shown = reader.get(path).text
        assert re.findall(r'<form[^>]*method="post"[^>]*>', shown) == [
            '<form class="who" method="post" action="/console/signout">'
        ], path  # only the sign-out form


# Pause and resume -------------------------------------------------------------------------------------------------


def test_a_pause_and_a_resume_need_a_reason_and_a_second_one_is_refused_with_a_notice(named, world: World) -> None:
    operator, csrf = signed_in(named, OPERATOR)

    blank = operator.post("/console/applying/pause", data={"csrf": csrf, "reason": "  "})
    assert blank.status_code == 400 and "A pause needs a reason" in blank.text and stored_pause(world) == []
    not_paused = operator.post("/console/applying/resume", data={"csrf": csrf, "reason": "done"})
    assert not_paused.status_code == 409 and "Not resumed: applying is not paused" in not_paused.text

    paused = operator.post("/console/applying/pause", data={"csrf": csrf, "reason": " db maintenance "})
    again = operator.post("/console/applying/pause", data={"csrf": csrf, "reason": "again"})

    assert paused.status_code == 303 and paused.location.startswith("/console/applying?notice=")
    assert stored_pause(world) == [("alice", "db maintenance")]
    assert again.status_code == 409 and "Not paused: applying is already paused by alice" in again.text
    unexplained = operator.post("/console/applying/resume", data={"csrf": csrf, "reason": ""})
    assert unexplained.status_code == 400 and "A resume needs a reason" in unexplained.text
    assert stored_pause(world) == [("alice", "db maintenance")]
    resumed = operator.post("/console/applying/resume", data={"csrf": csrf, "reason": "maintenance done"})
    assert resumed.status_code == 303 and stored_pause(world) == []
    assert world.p("SELECT actor, action, reason FROM consistency.audit_log ORDER BY id") == [
        ("alice", "pause", "db maintenance"),
        ("alice", "resume", "maintenance done"),
    ]


# Tier updates -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "shown"),
    [
        ({"TIER1": "abc"}, "TIER1: Input should be a valid decimal"),
        ({"TIER1": "0"}, "TIER1: must be greater than 0"),
        ({"TIER2_MV": "-1"}, "TIER2_MV: must be 0 or more"),
        ({"TIER3": "1.123456789"}, "TIER3: must have at most 8 decimal places"),
        ({"TIER3_MV": "1e12"}, "TIER3_MV: must be less than 1000000000000"),
        ({"TIER1_MV": "NaN"}, "TIER1_MV: Input should be a finite number"),
        ({"TIER1": "  ", "reason": "nothing"}, "give at least one of TIER1, TIER1_MV"),
        ({"TIER1": "5", "reason": "x" * 501}, "reason: String should have at most 500 characters"),
    ],
)
def test_a_bad_tier_value_shows_its_problem_and_stores_nothing(named, world: World, form: dict, shown: str) -> None:
    operator, csrf = signed_in(named, OPERATOR)
    tiers_before = stored_tiers(world)
    for path in ("/console/applying/tiers/review", "/console/applying/tiers"):
        answer = operator.post(path, data={**form, "csrf": csrf, "version": "3"})
        assert answer.status_code == 400 and shown in answer.text.replace("&#39;", "'"), answer.text
        assert "Nothing is stored" in answer.text
    nothing_changed(world, tiers_before)


def test_a_tier_update_is_shown_old_against_new_stored_only_when_confirmed_and_audited(named, world: World) -> None:
    operator, csrf = signed_in(named, OPERATOR)
    tiers_before = stored_tiers(world)

    review = operator.post(
        "/console/applying/tiers/review",
        data={"csrf": csrf, "TIER1_MV": "1100000", "TIER2": " 2500000.25 ", "TIER3": "", "reason": "new prices"},
    )

    assert review.status_code == 200 and "Confirm update" in review.text
    cells = re.findall(r"<tr><th scope=\"row\">(\w+)</th><td>([^<]*)</td><td>([^<]*)</td>", review.text)
    assert cells[:2] == [("TIER1_MV", "1000000", "1100000"), ("TIER2", "2000000", "2500000.25")]
    assert ("del_t1_mv", "0", "0.1") in cells and ("del_t2_mv", "0", "-0.20000008") in cells
    assert stored_tiers(world) == tiers_before and world.p("SELECT count(*) FROM consistency.audit_log") == [(0,)]

    hidden = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', review.text))
    assert set(hidden) == {"csrf", "version", "TIER1_MV", "TIER2", "reason"}
    stored = operator.post("/console/applying/tiers", data=hidden)

    assert stored.status_code == 303 and "Tier+values+updated" in stored.location
    assert stored_tiers(world)[:2] == [
        (1, Decimal("1000000"), Decimal("1100000")),
        (2, Decimal("2500000.25"), Decimal("2000000")),
    ]
    assert world.p("SELECT actor, action, target, reason, detail FROM consistency.audit_log") == [
        ("alice", "update_tier_values", {"tiers": ["TIER1_MV", "TIER2"]}, "new prices",
         {"values": {"TIER1_MV": "1100000", "TIER2": "2500000.25"}}),
    ]  # fmt: skip
    shown = operator.get("/console/applying").text
    assert "1000000 → 1100000" in shown and "2000000 → 2500000.25" in shown


def test_a_confirmation_of_values_changed_since_their_review_stores_nothing(named, world: World) -> None:
    operator, csrf = signed_in(named, OPERATOR)
    review = operator.post("/console/applying/tiers/review", data={"csrf": csrf, "TIER1_MV": "1100000"})
    hidden = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', review.text))
    service_of(named).update_tiers({"TIER1_MV": Decimal("900000")}, "bob", "meanwhile")

    late = operator.post("/console/applying/tiers", data=hidden)

    assert late.status_code == 409 and "changed since this update was reviewed" in late.text
    assert "<td>900000</td><td>1100000</td>" in late.text  # reviewed again against the values now
    assert stored_tiers(world)[0] == (1, Decimal("1000000"), Decimal("900000"))


def test_an_update_waiting_on_another_one_compares_the_version_under_the_lock(named, world: World) -> None:
    import threading

    import psycopg2

    import tiers

    svc = service_of(named)
    reviewed = int(svc.tier_history(1, None)["entries"][0]["id"])
    other = psycopg2.connect(world.portfolio_uri)
    with other.cursor() as cur:
        tiers.update(cur, {"TIER2_MV": Decimal("1800000")})  # holds the rows' lock, not yet committed
    outcome: list[object] = []

    def confirm() -> None:
        try:
            outcome.append(svc.update_tiers({"TIER1_MV": Decimal("1100000")}, "alice", None, reviewed))
        except tiers.TiersChanged as err:
            outcome.append(err)

    waiting = threading.Thread(target=confirm)
    waiting.start()
    waiting.join(1.0)
    assert waiting.is_alive()  # it waits for the other update's lock
    other.commit()
    waiting.join(10)
    other.close()

    assert len(outcome) == 1 and isinstance(outcome[0], tiers.TiersChanged)
    assert [row[2] for row in stored_tiers(world)] == [Decimal("1000000"), Decimal("1800000"), Decimal("500000")]
    assert world.p("SELECT count(*) FROM consistency.audit_log") == [(0,)]


# Drift checks -----------------------------------------------------------------------------------------------------


def test_a_drift_check_started_from_the_console_is_audited_and_a_second_is_refused_while_it_runs(
    named, world: World
) -> None:
    operator, csrf = signed_in(named, OPERATOR)

    started = operator.post("/console/drift-checks", data={"csrf": csrf, "reason": "after the restore"})
    again = operator.post("/console/drift-checks", data={"csrf": csrf, "reason": "once more"})

    (check,) = world.p("SELECT id, started_by, reason, state FROM consistency.drift_checks")
    assert check[1:] == ("alice", "after the restore", "running")
    assert started.status_code == 303 and started.location.startswith(f"/console/drift-checks/{check[0]}?notice=")
    assert again.status_code == 409 and f"Drift check {check[0]} is running" in again.text
    assert world.p("SELECT actor, action, target, reason FROM consistency.audit_log") == [
        ("alice", "start_drift_check", {"drift_check": check[0]}, "after the restore")
    ]
    report = operator.get(started.location)
    assert report.status_code == 200 and f"Drift check {check[0]}: running" in report.text
    assert operator.get(f"/console/drift-checks/{check[0] + 1}").status_code == 404


def test_a_report_groups_its_findings_by_kind_a_page_of_each_with_links(named, world: World) -> None:
    check = world.p(
        "INSERT INTO consistency.drift_checks (started_by, state, counts, finished_at)"
        " VALUES ('schedule', 'done', '{\"unapplied_entry\": 1500, \"unrecorded_transaction\": 1}', now())"
        " RETURNING id"
    )[0][0]
    world.p(
        "INSERT INTO consistency.drift_findings (check_id, kind, queue, queue_id, uuid, account_number, detail)"
        " SELECT %s, 'unapplied_entry', 'investment', n, 'u-' || n, '40000' || n, '{\"status\": \"COMPLETED\"}'"
        " FROM generate_series(1, 150) AS n",
        (check,),
    )
    world.p(
        "INSERT INTO consistency.drift_findings (check_id, kind, txn_id, account_number, detail)"
        " VALUES (%s, 'unrecorded_transaction', gen_random_uuid(), 'a&b', '{}')",
        (check,),
    )
    operator, _ = signed_in(named, OPERATOR)

    first = operator.get(f"/console/drift-checks/{check}").text
    more = operator.get(f"/console/drift-checks/{check}?kind=unapplied_entry&start=100").text

    assert "unapplied_entry findings 1 to 100 of 150 kept" in first and "The first 150 are kept" in first
    assert '<a href="/console/entries/investment/7">investment entry 7</a>' in first
    assert '<a href="/console/accounts?account=400007"><bdi>400007</bdi></a>' in first
    assert '<a href="/console/accounts?account=a%26b"><bdi>a&amp;b</bdi></a>' in first
    assert f"/console/drift-checks/{check}?kind=unapplied_entry&amp;start=100" in first
    assert "unapplied_entry findings 101 to 150 of 150 kept" in more
    assert '<h2 id="unrecorded_transaction">' not in more
    assert "investment entry 101<" in more and "investment entry 100<" not in more
    assert operator.get(f"/console/drift-checks/{check}?kind=nonsense").status_code == 400
    assert operator.get(f"/console/drift-checks/{check}?start=x").status_code == 400


def test_the_history_pages_follow_each_other(named, world: World) -> None:
    world.p(
        "INSERT INTO consistency.drift_checks (started_by, state, counts)"
        " SELECT 'schedule', 'done', '{}' FROM generate_series(1, 45)"
    )
    world.p("INSERT INTO consistency.audit_log (actor, action) SELECT 'alice', 'pause' FROM generate_series(1, 120)")
    operator, _ = signed_in(named, OPERATOR)

    for path, row, label in [("/console/drift-checks", "Report of check", "Older checks"),
                             ("/console/audit", "<td>pause</td>", "Older actions")]:  # fmt: skip
        rows, url = [], path
        while url:
            shown = operator.get(url).text
            rows.append(shown.count(row))
            older = re.search(rf'<a href="([^"]+)">{label}</a>', shown)
            url = older.group(1).replace("&amp;", "&") if older else None
        assert rows == ([20, 20, 5] if label == "Older checks" else [50, 50, 20]), path
    filtered = operator.get("/console/audit?action=pause&actor=alice&before=60").text
    assert filtered.count("<td>pause</td>") == 50
    assert 'href="/console/audit?action=pause&amp;actor=alice&amp;before=10"' in filtered
    assert operator.get("/console/audit?action=nonsense").status_code == 400
    assert operator.get("/console/audit?before=-1").status_code == 400
