"""Operator actions on parked entries: retry and resolve, one or in bulk, each audited under the token used, and
a resolved entry never applied, whatever its queue row does and whichever cycle meets it at the same moment."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from urllib.parse import urlsplit

import psycopg2
import pytest

from config import API_TOKEN_NAME, Credential
from devkit import roles
from devkit.net import wait_until
from service import service_of
from tests.conftest import API_TOKEN
from tests.tokens import OPERATOR, READER, bearer
from tests.world import World, expected

ACCOUNT, OTHER, THIRD = "1000000001", "1000000002", "1000000003"
PARKED = "/api/v1/consistency/parked"
ACTIONS = [
    f"{PARKED}/investment/1/retry",
    f"{PARKED}/investment/1/resolve",
    f"{PARKED}/retry",
    f"{PARKED}/resolve",
]


@pytest.fixture
def app(make_app):
    """The app, accepting the reader, the operator and API_TOKEN; the poller not started (a trigger runs here)."""
    flask_app = make_app(api_tokens=(READER, OPERATOR))
    service_of(flask_app).runner.prepare()
    return flask_app


@pytest.fixture
def client(app):
    """A test client of the app."""
    return app.test_client()


def post(client, path: str, body: object = None, credential: Credential = OPERATOR):
    """POST an action with a credential, and a JSON body when given."""
    return client.post(path, headers=bearer(credential), json=body)


def run_cycle(app) -> dict:
    """Run one cycle in this thread and return its summary."""
    return service_of(app).poller.run_once().to_json()


def audit_trail(world: World) -> list[tuple]:
    """Every audit record, oldest first: actor, action, target, reason, detail."""
    return world.p("SELECT actor, action, target, reason, detail FROM consistency.audit_log ORDER BY id")


def journal_of(world: World, request) -> list[tuple]:
    """An entry's journal records of operator actions, oldest first: kind, actor, reason, attempts."""
    return world.p(
        "SELECT kind, actor, reason, attempts FROM consistency.journal WHERE queue = %s AND queue_id = %s"
        " AND kind IN ('retried', 'resolved') ORDER BY id",
        (request.queue, request.queue_id),
    )


def parked_ids(world: World) -> set[tuple[str, int]]:
    """The (queue, queue_id) of every parked entry."""
    return set(world.p("SELECT queue, queue_id FROM consistency.parked_entries"))


def test_a_retry_of_a_parked_entry_applies_it_once_when_its_cause_is_fixed(app, client, world: World) -> None:
    world.set_tiers(TIER1_MV="1100000")
    orphan = world.request("investment", ACCOUNT, txn=False)
    run_cycle(app)
    path = f"{PARKED}/investment/{orphan.queue_id}/retry"

    still = post(client, path, {"reason": "portfolio service says it is fixed"})
    assert still.status_code == 200
    assert still.get_json()["entry"] == {
        "queue": "investment",
        "queue_id": orphan.queue_id,
        "result": "parked",
        "reason": f"no portfolio for account {ACCOUNT}",
        "attempts": 2,
    }
    assert still.get_json()["cycle"]["result"] == "ok"

    world.portfolio_for(ACCOUNT)
    world.transaction_for("investment", ACCOUNT, orphan.uuid)
    done = client.post(path, headers={"Authorization": f"Bearer {API_TOKEN}"})  # no body: the reason is optional
    assert done.status_code == 200
    assert done.get_json()["entry"] == {
        "queue": "investment",
        "queue_id": orphan.queue_id,
        "result": "applied",
        "outcome": "COMPLETED",
    }
    again = post(client, path)
    assert (again.status_code, again.get_json()["state"]) == (404, "applied")
    assert again.get_json()["error"] == f"investment entry {orphan.queue_id} is not parked: it was applied as COMPLETED"
    run_cycle(app)

    assert world.txn_status(orphan.uuid) == "PROCESSED"
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", ("1100000", "1000000"))
    assert world.applied() == 1
    target = {"queue": "investment", "queue_id": orphan.queue_id}
    assert [(a, act, t, r) for a, act, t, r, _ in audit_trail(world)] == [
        ("alice", "retry", target, "portfolio service says it is fixed"),
        (API_TOKEN_NAME, "retry", target, None),
    ]
    assert journal_of(world, orphan) == [
        ("retried", "alice", "portfolio service says it is fixed", 1),
        ("retried", API_TOKEN_NAME, None, 2),
    ]


def test_a_retry_while_paused_is_refused_and_recorded_nowhere(app, client, world: World) -> None:
    orphan = world.request("investment", ACCOUNT, txn=False)
    run_cycle(app)
    assert post(client, "/api/v1/consistency/pause", {"reason": "maintenance"}).status_code == 200

    refused = post(client, f"{PARKED}/investment/{orphan.queue_id}/retry")

    assert (refused.status_code, refused.get_json()["result"]) == (409, "paused")
    assert refused.get_json()["pause"]["paused_by"] == "alice"
    assert [action for _, action, *_ in audit_trail(world)] == ["pause"]
    assert journal_of(world, orphan) == []


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (f"{PARKED}/deposit/1/retry", "queue"),
        (f"{PARKED}/investment/x1/retry", "queue_id"),
        (f"{PARKED}/investment/-1/resolve", "queue_id"),
        (f"{PARKED}/investment/2147483648/resolve", "queue_id"),
        (f"{PARKED}/investment/%C2%B9/retry", "queue_id"),
    ],
)
def test_an_entry_path_that_names_no_possible_entry_gets_400(client, path: str, field: str) -> None:
    answer = post(client, path, {"reason": "r"})
    assert (answer.status_code, answer.get_json()["field"]) == (400, field)


def test_an_entry_that_is_not_parked_gets_404(client) -> None:
    for action in ("retry", "resolve"):
        answer = post(client, f"{PARKED}/withdrawal/12345/{action}", {"reason": "r"})
        assert (answer.status_code, answer.get_json()["state"]) == (404, "released")
        assert answer.get_json()["error"] == "withdrawal entry 12345 is not parked: no such entry is parked"


def test_a_resolved_entry_is_never_applied_even_when_its_queue_row_is_touched_again(app, client, world) -> None:
    orphan = world.request("investment", ACCOUNT, txn=False)
    kept = world.request("investment", OTHER, txn=False)
    run_cycle(app)
    path = f"{PARKED}/investment/{orphan.queue_id}/resolve"

    assert client.post(path, headers=bearer(OPERATOR)).status_code == 415  # the reason is required
    for body in ({}, {"reason": "  "}, {"reason": 7}, {"reason": "x" * 501}):
        answer = post(client, path, body)
        assert (answer.status_code, answer.get_json()["field"]) == (400, "reason"), body
    unknown = post(client, path, {"reason": "dup", "actor": "mallory"})
    assert (unknown.status_code, unknown.get_json()["field"]) == (400, "actor")
    assert parked_ids(world) == {("investment", orphan.queue_id), ("investment", kept.queue_id)}

    answer = post(client, path, {"reason": "refunded by hand, ticket 42"})

    assert answer.status_code == 200
    resolved = answer.get_json()["resolved"]
    assert (resolved["queue_id"], resolved["uuid"], resolved["resolved_by"]) == (orphan.queue_id, orphan.uuid, "alice")
    assert resolved["reason"] == f"no portfolio for account {ACCOUNT}"  # why it was parked
    assert resolved["resolved_reason"] == "refunded by hand, ticket 42"
    assert parked_ids(world) == {("investment", kept.queue_id)}
    listed = client.get(PARKED, headers=bearer(READER)).get_json()
    assert [e["queue_id"] for e in listed["entries"]] == [kept.queue_id]
    twice = post(client, path, {"reason": "again"})
    assert (twice.status_code, twice.get_json()["state"]) == (404, "resolved")
    assert world.p("SELECT resolved_by, reason, status FROM consistency.resolved_entries") == [
        ("alice", "refunded by hand, ticket 42", "COMPLETED")
    ]
    ((actor, action, target, reason, detail),) = audit_trail(world)
    assert (actor, action, target, reason) == (
        "alice",
        "resolve",
        {"queue": "investment", "queue_id": orphan.queue_id},
        "refunded by hand, ticket 42",
    )
    assert detail["parked_reason"] == f"no portfolio for account {ACCOUNT}" and detail["attempts"] == 1
    assert journal_of(world, orphan) == [("resolved", "alice", "refunded by hand, ticket 42", 1)]

    # The cause goes away, and the queue touches the row again: the same status, then open and settled again.
    world.portfolio_for(ACCOUNT)
    world.transaction_for("investment", ACCOUNT, orphan.uuid)
    world.finish(orphan, "COMPLETED")
    run_cycle(app)
    world.finish(orphan, "PENDING")
    run_cycle(app)
    world.finish(orphan, "COMPLETED")
    run_cycle(app)

    assert world.txn_status(orphan.uuid) == "PENDING"
    assert world.amounts(ACCOUNT)["tier1_value"] == Decimal("1000.00")
    assert world.applied() == 0
    assert parked_ids(world) == {("investment", kept.queue_id)}


@pytest.fixture
def lookback_app(pg, dbs, lookback_role, make_app, world: World):
    """The app as a role with schema/grants.sql only (look-back mode), sweeping in every cycle."""
    names = [urlsplit(uri).path.lstrip("/") for uri in dbs]
    world.p("DROP SCHEMA consistency CASCADE")
    roles.apply_grants(pg, lookback_role, *names)
    flask_app = make_app(
        queue_db_uri=roles.with_user(dbs[0], lookback_role),
        portfolio_db_uri=roles.with_user(dbs[1], lookback_role),
        lookback_window=0.5,
        reconcile_interval=0.0,
        api_tokens=(OPERATOR,),
    )
    service_of(flask_app).runner.prepare()
    return flask_app


def test_the_reconciliation_sweep_neither_applies_nor_counts_a_resolved_entry(lookback_app, world: World) -> None:
    client = lookback_app.test_client()
    orphan = world.request("withdrawal", ACCOUNT, "FAILED", txn=False)  # no portfolio transaction
    assert run_cycle(lookback_app)["counts"]["withdrawal"]["parked"] == 1
    assert post(client, f"{PARKED}/withdrawal/{orphan.queue_id}/resolve", {"reason": "never sent"}).status_code == 200
    world.portfolio_for(ACCOUNT)
    world.transaction_for("withdrawal", ACCOUNT, orphan.uuid)
    time.sleep(0.6)  # past the look-back window: only the sweep would find the entry now

    swept = run_cycle(lookback_app)

    assert (swept["mode"], swept["reconciled"]) == ("lookback", True)
    assert swept["counts"]["withdrawal"]["reconciled"] == 0
    assert world.txn_status(orphan.uuid) == "PENDING"
    assert world.applied() == 0 and parked_ids(world) == set()


def park_mixed(world: World) -> dict[str, list]:
    """Park entries of three kinds: two investments and a withdrawal without portfolios, one without a transaction."""
    world.portfolio_for(THIRD)
    parked = {
        "no portfolio, investment": [world.request("investment", ACCOUNT, txn=False) for _ in range(2)],
        "no portfolio, withdrawal": [world.request("withdrawal", OTHER, txn=False)],
        "no transaction": [world.request("investment", THIRD, txn=False)],
    }
    return parked


def entry_ids(answer) -> list[tuple[str, int]]:
    """The (queue, queue_id) of the entries a bulk answer lists, in order."""
    return [(e["queue"], e["queue_id"]) for e in answer.get_json()["entries"]]


def ids(requests) -> list[tuple[str, int]]:
    """The (queue, queue_id) of requests, in key order."""
    return sorted((r.queue, r.queue_id) for r in requests)


def changed_state(world: World) -> tuple:
    """Everything an action could change: parked and resolved entries, the ledger, the audit trail, the journal."""
    return (
        world.p("SELECT * FROM consistency.parked_entries ORDER BY queue, queue_id"),
        world.p("SELECT * FROM consistency.resolved_entries ORDER BY queue, queue_id"),
        world.applied(),
        audit_trail(world),
        world.p("SELECT count(*) FROM consistency.journal"),
    )


def test_a_bulk_resolve_dry_run_lists_exactly_the_matching_entries_and_changes_nothing(app, client, world) -> None:
    parked = park_mixed(world)
    run_cycle(app)
    body = {"filter": {"queue": "investment", "parked_reason": "no portfolio for"}, "reason": "test accounts"}
    before = changed_state(world)

    dry = post(client, f"{PARKED}/resolve", {**body, "dry_run": True})

    assert dry.status_code == 200
    assert entry_ids(dry) == ids(parked["no portfolio, investment"])
    assert dry.get_json()["count"] == 2 and dry.get_json()["more"] is False and dry.get_json()["dry_run"] is True
    assert {e["reason"] for e in dry.get_json()["entries"]} == {f"no portfolio for account {ACCOUNT}"}
    bounded = post(client, f"{PARKED}/resolve", {**body, "dry_run": True, "limit": 1}).get_json()
    assert (bounded["count"], bounded["more"]) == (1, True)
    by_account = post(client, f"{PARKED}/retry", {"filter": {"account": OTHER}, "dry_run": True})
    assert entry_ids(by_account) == ids(parked["no portfolio, withdrawal"])
    assert changed_state(world) == before

    first = post(client, f"{PARKED}/resolve", {**body, "limit": 1})
    rest = post(client, f"{PARKED}/resolve", body)

    everything = ids(parked["no portfolio, investment"])
    assert (entry_ids(first), first.get_json()["more"]) == (everything[:1], True)
    assert (entry_ids(rest), rest.get_json()["more"]) == (everything[1:], False)
    assert parked_ids(world) == set(ids(parked["no portfolio, withdrawal"] + parked["no transaction"]))
    trail = audit_trail(world)
    assert [(actor, action, reason) for actor, action, _, reason, _ in trail] == [
        ("alice", "resolve", "test accounts")
    ] * 2
    for (_, _, target, _, _), took in zip(trail, (everything[:1], everything[1:]), strict=True):
        assert target["filter"] == body["filter"] and target["count"] == len(took) == len(target["entries"])
        assert [(e["queue"], e["queue_id"]) for e in target["entries"]] == took
    for request in parked["no portfolio, investment"]:
        assert journal_of(world, request) == [("resolved", "alice", "test accounts", 1)]
    nothing = post(client, f"{PARKED}/resolve", body)
    assert (nothing.status_code, nothing.get_json()["count"]) == (200, 0)
    assert len(audit_trail(world)) == 2  # an action that matched nothing changed nothing


def test_a_bulk_retry_dry_run_changes_nothing_and_the_retry_applies_the_fixed_entries(app, client, world) -> None:
    parked = park_mixed(world)
    run_cycle(app)
    fixed = parked["no portfolio, investment"]
    before = changed_state(world)

    dry = post(client, f"{PARKED}/retry", {"filter": {"account": ACCOUNT}, "dry_run": True})

    assert entry_ids(dry) == ids(fixed)
    assert changed_state(world) == before
    world.portfolio_for(ACCOUNT)
    for request in fixed:
        world.transaction_for("investment", ACCOUNT, request.uuid)

    done = post(client, f"{PARKED}/retry", {"filter": {"account": ACCOUNT}, "reason": "portfolio opened"})

    assert done.status_code == 200
    assert [(e["queue_id"], e["result"], e["outcome"]) for e in done.get_json()["entries"]] == [
        (queue_id, "applied", "COMPLETED") for _, queue_id in ids(fixed)
    ]
    assert done.get_json()["cycle"]["result"] == "ok"
    assert all(world.txn_status(r.uuid) == "PROCESSED" for r in fixed)
    assert world.applied() == 2
    assert parked_ids(world) == set(ids(parked["no portfolio, withdrawal"] + parked["no transaction"]))
    ((actor, action, target, reason, _),) = audit_trail(world)
    assert (actor, action, reason) == ("alice", "retry", "portfolio opened")
    assert target["filter"] == {"account": ACCOUNT} and target["count"] == 2
    for request in fixed:
        assert journal_of(world, request) == [("retried", "alice", "portfolio opened", 1)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"reason": "r"}, "filter"),
        ({"filter": {}, "reason": "r"}, "filter"),
        ({"filter": {"colour": "red"}, "reason": "r"}, "filter.colour"),
        ({"filter": {"queue": "deposit"}, "reason": "r"}, "filter.queue"),
        ({"filter": {"account": ""}, "reason": "r"}, "filter.account"),
        ({"filter": {"parked_reason": 5}, "reason": "r"}, "filter.parked_reason"),
        ({"filter": {"account": ACCOUNT}}, "reason"),
        ({"filter": {"account": ACCOUNT}, "reason": "r", "limit": 0}, "limit"),
        ({"filter": {"account": ACCOUNT}, "reason": "r", "limit": 1001}, "limit"),
        ({"filter": {"account": ACCOUNT}, "reason": "r", "limit": 1.5}, "limit"),
        ({"filter": {"account": ACCOUNT}, "reason": "r", "limit": True}, "limit"),
        ({"filter": {"account": ACCOUNT}, "reason": "r", "dry_run": "yes"}, "dry_run"),
        ({"filter": {"account": ACCOUNT}, "reason": "r", "everything": True}, "everything"),
        ({"filter": {"account": "1000\u00000001"}, "reason": "r"}, "filter.account"),
        ({"filter": {"account": ACCOUNT}, "reason": "nul \u0000 inside"}, "reason"),
    ],
)
def test_a_bad_bulk_request_gets_400_naming_the_field(client, world: World, body: dict, field: str) -> None:
    world.request("investment", ACCOUNT, txn=False)
    answer = post(client, f"{PARKED}/resolve", body)
    assert (answer.status_code, answer.get_json()["field"]) == (400, field)
    assert audit_trail(world) == []


def test_a_limit_of_a_billion_digits_is_refused_at_once(client) -> None:
    body = '{"filter": {"account": "1"}, "reason": "r", "limit": 1e999999999}'
    started = time.monotonic()
    answer = client.post(f"{PARKED}/retry", headers=bearer(OPERATOR), data=body, content_type="application/json")
    assert (answer.status_code, answer.get_json()["field"]) == (400, "limit")
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("path", ACTIONS)
def test_an_action_needs_an_operate_token(app, client, world: World, path: str) -> None:
    orphan = world.request("investment", ACCOUNT, txn=False)
    run_cycle(app)
    path = path.replace("/1/", f"/{orphan.queue_id}/")
    body = {"filter": {"account": ACCOUNT}, "reason": "r"} if path.count("/") == 5 else {"reason": "r"}
    without = client.post(path, json=body)
    assert (without.status_code, without.headers["WWW-Authenticate"]) == (401, "Bearer")
    read = post(client, path, body, READER)
    assert read.status_code == 403
    assert read.get_json()["error"] == "the token of dashboard has the read role; this needs operate"
    assert parked_ids(world) == {("investment", orphan.queue_id)}
    assert audit_trail(world) == []
    assert post(client, path, body).status_code == 200


def blocked_sessions(world: World) -> int:
    """Count the service's sessions on user-portfolio-db that wait for a lock."""
    return world.p(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'consistency-manager-svc' AND wait_event_type = 'Lock'"
    )[0][0]


def in_thread(target) -> tuple[threading.Thread, list]:
    """Start `target` in a thread; its result lands in the list."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(target()), daemon=True)
    thread.start()
    return thread, result


@pytest.fixture
def fixed_orphan(app, world: World):
    """A parked entry whose cause is fixed: the next cycle's retry applies it."""
    orphan = world.request("investment", ACCOUNT, txn=False)
    run_cycle(app)
    world.portfolio_for(ACCOUNT)
    world.transaction_for("investment", ACCOUNT, orphan.uuid)
    return orphan


def test_a_resolve_waits_for_a_batch_applying_its_entry_and_then_finds_it_applied(
    app, client, world: World, fixed_orphan
) -> None:
    holder = psycopg2.connect(world.portfolio_uri)
    with holder.cursor() as cur:  # the retry's batch claims the entry, then waits for the portfolio table
        cur.execute("LOCK TABLE user_portfolios IN EXCLUSIVE MODE")
    cycle, _ = in_thread(lambda: run_cycle(app))
    wait_until(lambda: blocked_sessions(world) == 1, 10, "the retry to wait for the portfolio table")
    path = f"{PARKED}/investment/{fixed_orphan.queue_id}/resolve"
    resolve, answers = in_thread(lambda: post(client, path, {"reason": "too late"}))
    resolve.join(timeout=1)
    assert resolve.is_alive()  # it waits for the batch that holds the entry's parked row
    holder.rollback()
    holder.close()
    cycle.join(timeout=10)
    resolve.join(timeout=10)

    (answer,) = answers
    assert (answer.status_code, answer.get_json()["state"]) == (404, "applied")
    assert world.txn_status(fixed_orphan.uuid) == "PROCESSED" and world.applied() == 1
    assert world.p("SELECT count(*) FROM consistency.resolved_entries") == [(0,)]
    assert audit_trail(world) == []


def test_a_batch_waits_for_a_resolve_of_its_entry_and_then_leaves_it_out(
    app, client, world: World, fixed_orphan
) -> None:
    holder = psycopg2.connect(world.portfolio_uri)
    with holder.cursor() as cur:  # the resolve takes the parked row, then waits to write its audit record
        cur.execute("LOCK TABLE consistency.audit_log IN EXCLUSIVE MODE")
    path = f"{PARKED}/investment/{fixed_orphan.queue_id}/resolve"
    resolve, answers = in_thread(lambda: post(client, path, {"reason": "refunded by hand"}))
    wait_until(lambda: blocked_sessions(world) == 1, 10, "the resolve to wait for the audit trail")
    cycle, summaries = in_thread(lambda: run_cycle(app))
    wait_until(lambda: blocked_sessions(world) == 2, 10, "the retry's batch to wait for the parked row")
    holder.rollback()
    holder.close()
    resolve.join(timeout=10)
    cycle.join(timeout=10)

    assert answers[0].status_code == 200
    assert summaries[0]["result"] == "ok" and summaries[0]["counts"]["investment"]["COMPLETED"] == 0
    assert world.txn_status(fixed_orphan.uuid) == "PENDING" and world.applied() == 0
    assert parked_ids(world) == set()
    assert world.p("SELECT resolved_by FROM consistency.resolved_entries") == [("alice",)]
