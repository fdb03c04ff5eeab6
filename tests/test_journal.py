"""The journal: every applied entry's outcome with the tier amounts before and after and the tier values in force,
parkings recorded when they start and when their reason changes, releases and corrections, and the two
endpoints that read it: one account's records, newest first, and one entry's whole story."""

from __future__ import annotations

from decimal import Decimal

import psycopg2
import pytest

from service import service_of
from tests.world import World, expected

ACCOUNT, OTHER = "3000000001", "3000000002"
START_VALUES = (Decimal("1000.00"), Decimal("2000.00"), Decimal("3000.00"))
START_ALLOCATIONS = (Decimal("100.00"), Decimal("200.00"), Decimal("300.00"))
# Tier 1 rises 10%, tier 2 falls 5%, tier 3 stays: investments apply 11/10, 19/20, 1; withdrawals 9/10, 21/20, 1.
PRICES = {"TIER1_MV": "1100000", "TIER2_MV": "1900000"}
INVEST = (("11", "10"), ("19", "20"), ("1", "1"))
WITHDRAW = (("9", "10"), ("21", "20"), ("1", "1"))


@pytest.fixture
def priced(client, auth, world: World) -> World:
    """Two portfolios, and tier prices changed through the API, as an operator does."""
    world.portfolio_for(ACCOUNT)
    world.portfolio_for(OTHER)
    assert client.post("/api/v1/consistency/update-tier-values", headers=auth, json=PRICES).status_code == 200
    return world


def run_cycle(client) -> int:
    """Run one cycle of the app's service; return its number."""
    result = service_of(client.application).runner.run()
    assert result.outcome == "ok", result
    return result.work.cycle


def journal(client, auth, account: str, **params: object) -> dict:
    """Read one page of an account's journal."""
    query = "&".join(f"{k}={v}" for k, v in {"account": account, **params}.items())
    answer = client.get(f"/api/v1/consistency/journal?{query}", headers=auth)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def story(client, auth, queue: str, queue_id: int) -> dict:
    """Read one entry's story."""
    answer = client.get(f"/api/v1/consistency/entries/{queue}/{queue_id}", headers=auth)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def stepped(start: tuple[Decimal, ...], factors: tuple[tuple[str, str], ...]) -> list[str]:
    """The oracle's amounts after one step of each tier's factor, as the journal shows them."""
    return [str(expected(amount, factor)) for amount, factor in zip(start, factors, strict=True)]


def test_each_applied_entry_records_its_amounts_before_and_after_and_the_tier_values_in_force(
    client, auth, priced: World
) -> None:
    first = priced.request("investment", ACCOUNT)
    failed = priced.request("investment", ACCOUNT, "FAILED")
    second = priced.request("investment", ACCOUNT)
    withdrawal = priced.request("withdrawal", ACCOUNT)
    cycle = run_cycle(client)

    records = journal(client, auth, ACCOUNT)["entries"]
    by_id = {(r["queue"], r["queue_id"]): r for r in records}
    assert [r["kind"] for r in records] == ["applied"] * 4
    assert [r["id"] for r in records] == sorted((r["id"] for r in records), reverse=True)  # newest first
    after_first = stepped(START_VALUES, INVEST)
    assert (by_id["investment", first.queue_id]["before"], by_id["investment", first.queue_id]["after"]) == (
        [str(v) for v in START_VALUES],
        after_first,
    )
    assert by_id["investment", first.queue_id]["id"] < by_id["investment", second.queue_id]["id"]  # as applied
    after_second = stepped(tuple(Decimal(v) for v in after_first), INVEST)
    assert by_id["investment", second.queue_id]["before"] == after_first
    assert by_id["investment", second.queue_id]["after"] == after_second
    assert by_id["withdrawal", withdrawal.queue_id]["before"] == [str(v) for v in START_ALLOCATIONS]
    assert by_id["withdrawal", withdrawal.queue_id]["after"] == stepped(START_ALLOCATIONS, WITHDRAW)
    assert [Decimal(v) for v in after_second] == [priced.amounts(ACCOUNT)[f"tier{n}_value"] for n in (1, 2, 3)]
    assert (by_id["investment", failed.queue_id]["status"], by_id["investment", failed.queue_id]["after"]) == (
        "FAILED",
        None,
    )
    assert {r["cycle"] for r in records} == {cycle}
    assert by_id["investment", first.queue_id]["portfolio_transaction"] == first.uuid

    told = story(client, auth, "investment", first.queue_id)
    assert (told["state"], told["ledger"]["status"], told["queue_row"]["status"]) == (
        "applied",
        "COMPLETED",
        "COMPLETED",
    )
    (applied,) = told["records"]
    in_force = applied["tiers_in_force"]
    assert (in_force["TIER1_MV"], in_force["TIER2_MV"], in_force["factors"]) == (
        "1100000",
        "1900000",
        ["1.1", "0.95", "1"],
    )
    withdrawn = story(client, auth, "withdrawal", withdrawal.queue_id)["records"][0]["tiers_in_force"]
    assert withdrawn["factors"] == ["0.9", "1.05", "1"]
    assert journal(client, auth, OTHER)["entries"] == []


def test_pages_of_an_account_follow_each_other_newest_first(client, auth, priced: World) -> None:
    requests = [priced.request("investment", ACCOUNT) for _ in range(5)]
    run_cycle(client)
    seen, before = [], None
    while True:
        page = journal(client, auth, ACCOUNT, limit=2, **({"before": before} if before else {}))
        seen += [r["queue_id"] for r in page["entries"]]
        before = page["next_before"]
        if before is None:
            break
    assert seen == [r.queue_id for r in reversed(requests)]


def test_a_parking_is_recorded_when_it_starts_and_when_its_reason_changes_not_at_every_retry(
    client, auth, world: World
) -> None:
    orphan = world.request("investment", ACCOUNT, txn=False)
    for _ in range(3):
        run_cycle(client)
    told = story(client, auth, "investment", orphan.queue_id)
    assert (told["state"], told["parked"]["attempts"]) == ("parked", 3)
    assert [(r["kind"], r["reason"], r["attempts"]) for r in told["records"]] == [
        ("parked", f"no portfolio for account {ACCOUNT}", 1)
    ]

    world.portfolio_for(ACCOUNT)  # the reason changes: its transaction is still missing
    run_cycle(client)
    run_cycle(client)
    world.transaction_for("investment", ACCOUNT, orphan.uuid)
    run_cycle(client)

    told = story(client, auth, "investment", orphan.queue_id)
    assert told["state"] == "applied" and told["parked"] is None
    assert [(r["kind"], r["reason"], r["attempts"]) for r in told["records"]] == [
        ("parked", f"no portfolio for account {ACCOUNT}", 1),
        ("parked", "no portfolio transaction with this id", 4),
        ("applied", None, 5),  # the attempts of the parking it ended
    ]
    assert told["records"][2]["before"] == [str(v) for v in START_VALUES]


def test_a_release_and_a_correction_are_part_of_the_story(client, auth, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    orphan = world.request("investment", ACCOUNT, txn=False)
    run_cycle(client)
    world.finish(orphan, "PENDING")  # open again: it leaves the parked list
    run_cycle(client)
    assert [r["kind"] for r in story(client, auth, "investment", orphan.queue_id)["records"]] == ["parked", "released"]

    settled = world.request("investment", ACCOUNT)
    run_cycle(client)
    holder = psycopg2.connect(world.queue_uri)  # an open transaction holds the watermark: rows are read again
    holder.cursor().execute("SELECT 1")
    world.finish(settled, "FAILED")
    run_cycle(client)
    world.finish(settled, "COMPLETED")
    run_cycle(client)
    holder.close()
    told = story(client, auth, "investment", settled.queue_id)
    assert [(r["kind"], r["status"]) for r in told["records"]] == [
        ("applied", "COMPLETED"),
        ("corrected", "FAILED"),
        ("agrees_again", "COMPLETED"),
    ]
    assert told["records"][1]["reason"] == "applied as COMPLETED, now FAILED in the queue"
    assert told["correction"] is None


def test_an_entry_the_service_has_not_applied_yet_has_a_story_too(client, auth, world: World) -> None:
    world.portfolio_for(ACCOUNT)
    waiting = world.enqueue("investment", ACCOUNT)
    told = story(client, auth, "investment", waiting.queue_id)
    assert (told["state"], told["records"], told["queue_row"]["uuid"]) == ("open", [], waiting.uuid)


def test_an_unknown_entry_is_404(client, auth) -> None:
    answer = client.get("/api/v1/consistency/entries/investment/999", headers=auth)
    assert answer.status_code == 404
    assert "error" in answer.get_json()


@pytest.mark.parametrize(
    ("path", "field"),
    [("savings/1", "queue"), ("investment/2147483648", "queue_id"), ("investment/-1", "queue_id"),
     ("investment/abc", "queue_id"), ("investment/1.5", "queue_id")],
)  # fmt: skip
def test_a_path_that_names_no_possible_entry_is_400_naming_the_parameter(client, auth, path: str, field: str) -> None:
    answer = client.get(f"/api/v1/consistency/entries/{path}", headers=auth)
    assert answer.status_code == 400
    assert answer.get_json()["field"] == field and answer.is_json


@pytest.mark.parametrize("query", ["", "account=", "account=1&account=2", "account=" + "9" * 65])
def test_the_journal_needs_one_account(client, auth, query: str) -> None:
    answer = client.get(f"/api/v1/consistency/journal?{query}", headers=auth)
    assert (answer.status_code, answer.get_json()["field"]) == (400, "account")


@pytest.mark.parametrize("path", ["/api/v1/consistency/journal?account=1", "/api/v1/consistency/entries/investment/1"])
def test_the_journal_needs_a_token(client, path: str) -> None:
    assert client.get(path).status_code == 401
