"""Versioned SQL: migration 4 adds the apply steps (_v1) beside apply_batch_v2, and both apply each entry once."""

from __future__ import annotations

import random
import uuid as uuidlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import psycopg2
import psycopg2.extensions
import pytest

import apply
import migrations
from apply import CAREFUL_STEPS, apply_batch_table, factor_arrays, load_entries, run_steps, step_params
from db import pg_array
from devkit import ROOT
from devkit import postgres as pgtest
from domain import INVESTMENT, WITHDRAWAL, Entry, Queue
from tests.world import (
    STAMP,
    World,
    claim_raced,
    expected,
)

ACCOUNT = "1000000001"
RISE = ("1100000", "1000000")
FACTORS = (Fraction(11, 10), Fraction(1), Fraction(1))
STEPS = {"claim_batch_v1", "check_batch_v1", "compound_batch_v1", "settle_batch_v1"}
T0 = datetime(2026, 12, 1, tzinfo=UTC)

# What a pod of the previous release runs for a loaded batch (its sql/queries.sql, named apply_batch).
APPLY_BATCH_V2 = (
    "SELECT outcome, entries FROM consistency.apply_batch_v2(%(queue)s, %(transaction_type)s, %(columns)s,"
    " %(retrying)s, %(numerators)s::numeric[], %(denominators)s::numeric[])"
)


def apply_entries(cur, queue, entries, factors, retrying=False):
    """Load entries into the batch table and apply them set-based, as a cycle does."""
    load_entries(cur, entries)
    return apply_batch_table(cur, queue, factors, STAMP, retrying, pg_array(e.queue_id for e in entries))


def apply_with_v2(
    cur: psycopg2.extensions.cursor,
    queue: Queue,
    entries: list[Entry],
    factors: tuple[Fraction, ...],
    retrying: bool = False,
) -> Counter[str]:
    """Apply entries the way the previous release does: one call of apply_batch_v2."""
    load_entries(cur, entries)
    params = {"queue": queue.name, "transaction_type": queue.transaction_type, "columns": queue.portfolio_columns}
    cur.execute(APPLY_BATCH_V2, {**params, "retrying": retrying, **factor_arrays(factors)})
    return Counter(dict(cur.fetchall()))


def apply_functions(cur: psycopg2.extensions.cursor) -> set[str]:
    """Name the apply functions the state schema holds."""
    cur.execute(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'consistency'::regnamespace AND proname LIKE '%%batch%%'"
    )
    return {row[0] for row in cur.fetchall()}


@pytest.fixture
def at_version_3(pg: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user-portfolio-db migrated as the previous release left it: up to migration 3."""
    name = pgtest.unique_name("cm_v3")
    pgtest.admin(pg, f'CREATE DATABASE "{name}"')
    uri = pgtest.with_database(pg, name)
    previous = [m for m in migrations.available_migrations() if m[0] <= 3]
    with monkeypatch.context() as patched:
        patched.setattr(migrations, "available_migrations", lambda: previous)
        pgtest.apply_schema(uri, ROOT / "schema" / "user_portfolio_db.sql", migrations.migrate)
    yield uri
    pgtest.drop(pg, name)


def test_one_upgrade_keeps_apply_batch_v2_beside_the_steps_and_each_entry_applies_once(
    pg: str, at_version_3: str
) -> None:
    world = World(pgtest.with_database(pg, "postgres"), at_version_3)
    world.portfolio_for(ACCOUNT)
    old, new, late = (world.transaction_for("investment", ACCOUNT) for _ in range(3))
    first = Entry(1, ACCOUNT, old, "COMPLETED", T0)
    respelled = Entry(2, ACCOUNT, old.upper(), "COMPLETED", T0 + timedelta(seconds=1))
    second = Entry(3, ACCOUNT, new, "COMPLETED", T0 + timedelta(seconds=2))
    third = Entry(4, ACCOUNT, late, "COMPLETED", T0 + timedelta(seconds=3))
    conn = psycopg2.connect(at_version_3)
    try:
        with conn, conn.cursor() as cur:
            assert "apply_batch_v2" in apply_functions(cur)
            assert not STEPS & apply_functions(cur)
            assert apply_with_v2(cur, INVESTMENT, [first], FACTORS) == {"COMPLETED": 1}

        with conn, conn.cursor() as cur:
            assert migrations.migrate(cur) == [v for v, _, _ in migrations.available_migrations() if v >= 4]
            assert {"apply_batch_v2", *STEPS} <= apply_functions(cur)

        # This release, through the steps: the old entry read again, another spelling of its transaction, a new one.
        with conn, conn.cursor() as cur:
            assert apply_entries(cur, INVESTMENT, [first, respelled, second], FACTORS) == {"COMPLETED": 1, "parked": 1}
        # A pod of the previous release during the rollout: everything again, and one entry more.
        with conn, conn.cursor() as cur:
            assert apply_with_v2(cur, INVESTMENT, [first, second, third], FACTORS) == {"COMPLETED": 1}
    finally:
        conn.close()

    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", RISE, RISE, RISE)
    assert [world.txn_status(txn) for txn in (old, new, late)] == ["PROCESSED"] * 3
    assert world.parked() == {old.upper(): "portfolio transaction already settled by investment entry 1"}
    assert world.p("SELECT queue_id, txn_id::text FROM consistency.applied_entries ORDER BY queue_id") == [
        (1, old),
        (3, new),
        (4, late),
    ]
    world.close()


def test_a_claim_by_apply_batch_v2_holds_the_steps_off_its_transaction(dbs: tuple[str, str]) -> None:
    """During a rollout the two versions share one unique record: the database, not a check, keeps them apart."""
    world = World(*dbs)
    world.portfolio_for(ACCOUNT)
    txn = world.transaction_for("investment", ACCOUNT)
    first, second = Entry(1, ACCOUNT, txn, "COMPLETED", T0), Entry(2, ACCOUNT, txn.upper(), "COMPLETED", T0)
    outcome = claim_raced(
        dbs[1],
        lambda cur: apply_with_v2(cur, INVESTMENT, [first], FACTORS),  # the previous release's pod
        lambda cur: apply_entries(cur, INVESTMENT, [second], FACTORS),  # this release's
    )

    assert outcome == {"parked": 1}
    assert world.amounts(ACCOUNT)["tier1_value"] == expected("1000.00", RISE)
    assert world.parked() == {txn.upper(): "portfolio transaction already settled by investment entry 1"}
    world.close()


# Per tier: a portfolio's value and allocation. A value of 3e12 overflows NUMERIC(15,2) after a few rises.
AMOUNTS = (("1000.00", "100.00"), ("3000000000000.00", "0.00"))
SPELLINGS = (str, str, str, str.upper, lambda u: u.replace("-", ""), lambda u: "{" + u + "}", lambda u: "urn:uuid:" + u)
STATUSES = ["COMPLETED"] * 10 + ["FAILED"] * 2 + ["CANCELLED"] * 2 + ["PENDING", "PROCESSING", "completed", "", None]


class Scenario:
    """Portfolios, transactions and queue entries with every kind of trouble, drawn from one seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.accounts = [f"10000000{n:02d}" for n in range(6)]  # the last one has no portfolio
        self.portfolios = {a: self.rng.choice(AMOUNTS) for a in self.accounts[:5]}
        self.transactions: list[tuple[str, str, str]] = []  # id, account, type
        self.entries = {queue.name: self._entries(queue, 40) for queue in (INVESTMENT, WITHDRAWAL)}

    def _entries(self, queue: Queue, count: int) -> list[Entry]:
        """Queue entries of one queue, in (updated_at, queue_id) order, naming transactions of every kind."""
        rng, entries = self.rng, []
        for n in range(1, count + 1):
            account = rng.choice([*self.accounts, *self.accounts, None])
            txn = self._transaction(queue, account)
            spelled = None if txn is None else rng.choice(SPELLINGS)(txn)
            spelled = rng.choice([spelled] * 9 + ["not-a-uuid"])
            entries.append(Entry(n, account, spelled, rng.choice(STATUSES), T0 + timedelta(seconds=n // 2)))
        return entries

    def _transaction(self, queue: Queue, account: str | None) -> str | None:
        """A transaction for an entry: mostly its own, sometimes one named before, another's, or none."""
        kind = self.rng.choice(["own"] * 6 + ["again", "other account", "other type", "missing"])
        if kind == "again" and self.transactions:
            return self.rng.choice(self.transactions)[0]
        if kind == "missing":
            return str(uuidlib.UUID(int=self.rng.getrandbits(128)))
        owner = self.rng.choice(self.accounts[:5]) if kind == "other account" or account is None else account
        kind_of = {"other type": "WITHDRAWAL" if queue is INVESTMENT else "INVEST"}.get(kind, queue.transaction_type)
        if owner not in self.portfolios:
            return str(uuidlib.UUID(int=self.rng.getrandbits(128)))  # a transaction needs its portfolio
        self.transactions.append((str(uuidlib.UUID(int=self.rng.getrandbits(128))), owner, kind_of))
        return self.transactions[-1][0]

    def build(self, cur: psycopg2.extensions.cursor) -> None:
        """Create the portfolios and transactions, as the portfolio service does."""
        for account, (value, allocation) in self.portfolios.items():
            cur.execute(
                "INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,"
                " total_allocation, tier1_value, tier2_value, tier3_value, total_value)"
                " VALUES (%s, %s, %s, %s, 3 * %s::numeric, %s, %s, %s, 3 * %s::numeric)",
                (account, *[allocation] * 4, *[value] * 4),
            )
        for txn, account, kind in self.transactions:
            cur.execute(
                "INSERT INTO portfolio_transactions (id, accountid, transaction_type) VALUES (%s, %s, %s)",
                (txn, account, kind),
            )

    def changed(self, entries: list[Entry]) -> list[Entry]:
        """The same entries read again after the queue changed some statuses (corrections, fixes, reopenings)."""
        return [
            Entry(e.queue_id, e.account_number, e.uuid, self.rng.choice([e.status, e.status, *STATUSES]), e.updated_at)
            for e in entries
        ]


FACTOR_SETS = {
    "rising": {"investment": FACTORS, "withdrawal": (Fraction(9, 10), Fraction(1), Fraction(19, 20))},
    "negative": {"investment": (Fraction(3), Fraction(1), Fraction(1)), "withdrawal": (Fraction(-1, 2),) * 3},
}


def batch_plan(scenario: Scenario, factor_set: str) -> list[tuple[Queue, tuple, list[list[Entry]], list[Entry]]]:
    """Per queue: its factors, its three batches (the first read, a read after the queue changed, the rest), and
    the entries a retry of the parked ones reads afresh. Drawn once per scenario, in the same order every time."""
    plan = []
    for queue in (INVESTMENT, WITHDRAWAL):
        factors, entries = FACTOR_SETS[factor_set][queue.name], scenario.entries[queue.name]
        changed = scenario.changed(entries[:30])
        plan.append((queue, factors, [entries[:20], changed[10:30], entries[30:]], [*changed, *entries[30:]]))
    return plan


def run_batches(conn: psycopg2.extensions.connection, scenario: Scenario, factor_set: str, apply) -> list[object]:
    """Apply the scenario's batches of both queues, read again and retried, one transaction each; return outcomes."""
    outcomes: list[object] = []
    for queue, factors, batches, retry_pool in batch_plan(scenario, factor_set):
        for batch in batches:
            with conn, conn.cursor() as cur:
                outcomes.append(apply(cur, queue, batch, factors))
        with conn, conn.cursor() as cur:
            cur.execute("SELECT queue_id FROM consistency.parked_entries WHERE queue = %s", (queue.name,))
            parked = {row[0] for row in cur.fetchall()}
            retried = [e for e in retry_pool if e.queue_id in parked]
            outcomes.append(apply(cur, queue, retried, factors, retrying=True))
    return outcomes


STATE = {
    "portfolios": "SELECT accountid, tier1_value, tier2_value, tier3_value, total_value, tier1_allocation,"
    " tier2_allocation, tier3_allocation, total_allocation FROM user_portfolios ORDER BY accountid",
    "transactions": "SELECT id, status FROM portfolio_transactions ORDER BY id",
    "applied": "SELECT queue, queue_id, uuid, txn_id, status FROM consistency.applied_entries ORDER BY queue, queue_id",
    "parked": "SELECT queue, queue_id, uuid, account_number, status, updated_at, reason, attempts"
    " FROM consistency.parked_entries ORDER BY queue, queue_id",
    "corrections": "SELECT queue, queue_id, uuid, applied_status, queue_status FROM consistency.corrections"
    " ORDER BY queue, queue_id",
}


JOURNAL = (
    "SELECT queue, queue_id, account_number, kind, status, attempts, reason, tier1_before, tier2_before, tier3_before,"
    " tier1_after, tier2_after, tier3_after, tier_version, cycle FROM consistency.journal ORDER BY id"
)


def outcome_and_state(
    pg: str, template: str, seed: int, factor_set: str, apply, scenario_of=Scenario, state=STATE
) -> dict[str, object]:
    """Run one seed's scenario on a fresh database with one apply, and read back everything it left."""
    name = pgtest.clone(pg, template)
    conn = psycopg2.connect(pgtest.with_database(pg, name))
    try:
        scenario = scenario_of(seed)
        with conn, conn.cursor() as cur:
            scenario.build(cur)
        found: dict[str, object] = {"outcomes": run_batches(conn, scenario, factor_set, apply)}
        with conn, conn.cursor() as cur:
            for key, statement in state.items():
                cur.execute(statement)
                found[key] = cur.fetchall()
        return found
    finally:
        conn.close()
        pgtest.drop(pg, name)


# The model's own rules, written out rather than taken from domain.py or the SQL, so that neither can agree with
# itself: the status each settled queue status gives its transaction, and the type each queue's transactions have.
MIRROR = {"COMPLETED": "PROCESSED", "FAILED": "FAILED", "CANCELLED": "CANCELLED"}
NOT_SETTLED = ("PENDING", "PROCESSING")
KIND = {"investment": ("INVEST", "values"), "withdrawal": ("WITHDRAWAL", "allocations")}
TOTAL_LIMIT = Decimal(10) ** 13  # NUMERIC(15,2): a total of 10^13 does not fit


def as_transaction(spelled: str | None) -> str | None:
    """The portfolio transaction a queue uuid names, as Python reads a UUID, or None when it names none."""
    try:
        return str(uuidlib.UUID(spelled)) if spelled else None
    except ValueError:
        return None


def shown_status(status: str | None) -> str:
    """A status as a parking reason quotes it."""
    return "NULL" if status is None else "'" + status.replace("'", "''") + "'"


class BatchModel:
    """What a scenario's batches must leave, worked out entry by entry from the documented rules (docs/concepts/),
    without SQL.

    Each batch is one transaction: entries parked before are left to the retry; an entry applied before is
    compared with its queue row (a correction, or the end of one); an entry not settled yet is left alone; an
    unknown status, a transaction another entry settled, and every check that fails park the entry with its
    reason; completed entries compound per portfolio in (updated_at, queue_id) order, each step rounded half away
    from zero, until one would be negative or overflow, which parks it and the account's later entries.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.amounts = {
            account: {"values": [Decimal(value)] * 3, "allocations": [Decimal(allocation)] * 3}
            for account, (value, allocation) in scenario.portfolios.items()
        }
        self.transactions = {txn: [account, kind, "PENDING"] for txn, account, kind in scenario.transactions}
        self.ledger: dict[tuple[str, int], tuple[str | None, str | None, str]] = {}  # txn, spelling, status
        self.parked: dict[tuple[str, int], tuple[str, int, str | None]] = {}  # reason, attempts, status
        self.corrections: dict[tuple[str, int], tuple[str, str | None]] = {}  # applied, now in the queue

    def apply(self, queue: Queue, entries: list[Entry], factors: tuple, retrying: bool = False) -> dict[str, int]:
        """Apply one batch; return how many entries had each outcome."""
        batch = sorted(
            (e for e in entries if retrying or (queue.name, e.queue_id) not in self.parked),
            key=lambda e: (e.updated_at, e.queue_id),
        )
        reasons: dict[int, str] = {}
        claimed = [e for e in batch if self._claim(queue.name, e, reasons)]
        for entry in claimed:
            reason = self._check(queue.name, entry)
            if reason:
                reasons[entry.queue_id] = reason
        self._compound(queue.name, [e for e in claimed if e.status == "COMPLETED"], factors, reasons)
        return self._settle(queue.name, batch, claimed, reasons)

    def _claim(self, queue: str, entry: Entry, reasons: dict[int, str]) -> bool:
        """Record a settled entry as applied, unless it was before, is not settled, or its transaction is taken."""
        key, txn = (queue, entry.queue_id), as_transaction(entry.uuid)
        if key in self.ledger:
            applied = self.ledger[key][2]
            if entry.status == applied:
                self.corrections.pop(key, None)
            else:
                self.corrections[key] = (applied, entry.status)
            return False
        if entry.status in NOT_SETTLED:
            return False
        if entry.status not in MIRROR:
            reasons[entry.queue_id] = f"unknown status {shown_status(entry.status)}"
            return False
        holder = next((k for k, record in self.ledger.items() if txn and record[0] == txn), None)
        if holder:
            reasons[entry.queue_id] = f"portfolio transaction already settled by {holder[0]} entry {holder[1]}"
            return False
        self.ledger[key] = (txn, None if entry.uuid == txn else entry.uuid, entry.status)
        return True

    def _check(self, queue: str, entry: Entry) -> str | None:
        """The reason a claimed entry cannot apply, in the order docs/concepts/parked-entries.md lists them; None when
        it can."""
        txn = as_transaction(entry.uuid)
        if entry.status == "COMPLETED" and entry.account_number not in self.amounts:
            return f"no portfolio for account {entry.account_number or '(none)'}"
        if txn is None:
            return "uuid is not a valid UUID"
        if txn not in self.transactions:
            return "no portfolio transaction with this id"
        account, kind, _ = self.transactions[txn]
        if account != entry.account_number:
            return f"portfolio transaction belongs to account {account}"
        if kind != KIND[queue][0]:
            return f"portfolio transaction is {kind}, expected {KIND[queue][0]}"
        return None

    def _compound(self, queue: str, completed: list[Entry], factors: tuple, reasons: dict[int, str]) -> None:
        """Multiply each portfolio's amounts by the factors once per completed entry that can apply, in order."""
        steps = [(str(f.numerator), str(f.denominator)) for f in factors]
        for account in dict.fromkeys(e.account_number for e in completed if e.queue_id not in reasons):
            mine = [e for e in completed if e.account_number == account and e.queue_id not in reasons]
            amounts = self.amounts[account][KIND[queue][1]]
            for n in range(len(mine)):
                after = [expected(amount, step) for amount, step in zip(amounts, steps, strict=True)]
                problem = (
                    "result would be negative"
                    if min(after) < 0
                    else "result would overflow NUMERIC(15,2)"
                    if sum(after) >= TOTAL_LIMIT
                    else None
                )
                if problem:
                    reasons.update((later.queue_id, problem) for later in mine[n:])
                    break
                amounts[:] = after

    def _settle(self, queue: str, batch: list[Entry], claimed: list[Entry], reasons: dict[int, str]) -> dict[str, int]:
        """Park what has a reason (giving back its claim), mirror the rest onto their transactions; count both."""
        counts: Counter[str] = Counter()
        for entry in batch:
            key = (queue, entry.queue_id)
            if entry.queue_id in reasons:
                if entry in claimed:
                    del self.ledger[key]
                attempts = self.parked[key][1] + 1 if key in self.parked else 1
                self.parked[key] = (reasons[entry.queue_id], attempts, entry.status)
                counts["parked"] += 1
            elif entry in claimed:
                self.transactions[as_transaction(entry.uuid)][2] = MIRROR[entry.status]
                self.parked.pop(key, None)
                counts[entry.status] += 1
        return dict(counts)

    def state(self) -> dict[str, object]:
        """The end state, in the shape `seen_state` gives the database's."""
        portfolios = [
            (account, *a["values"], sum(a["values"]), *a["allocations"], sum(a["allocations"]))
            for account, a in sorted(self.amounts.items())
        ]
        return {
            "portfolios": portfolios,
            "transactions": sorted((txn, t[2]) for txn, t in self.transactions.items()),
            "applied": sorted((*key, spelled, txn, status) for key, (txn, spelled, status) in self.ledger.items()),
            "parked": sorted((*key, *parking) for key, parking in self.parked.items()),
            "corrections": sorted((*key, *correction) for key, correction in self.corrections.items()),
        }


def model_outcome_and_state(seed: int, factor_set: str, scenario_of=Scenario) -> dict[str, object]:
    """What the model says a scenario's batches, read again and retried as run_batches does, must leave."""
    scenario = scenario_of(seed)
    model, outcomes = BatchModel(scenario), []
    for queue, factors, batches, retry_pool in batch_plan(scenario, factor_set):
        outcomes += [model.apply(queue, batch, factors) for batch in batches]
        retried = [e for e in retry_pool if (queue.name, e.queue_id) in model.parked]
        outcomes.append(model.apply(queue, retried, factors, retrying=True))
    return {"outcomes": outcomes, **model.state()}


def seen_state(found: dict[str, object]) -> dict[str, object]:
    """What a run left, in the model's shape: the outcomes and the rows, less what the model does not follow."""
    kept = ("COMPLETED", "FAILED", "CANCELLED", "parked")
    outcomes, applied, parked, corrections = (found[key] for key in ("outcomes", "applied", "parked", "corrections"))
    return {
        "outcomes": [{k: v for k, v in counts.items() if k in kept and v} for counts in outcomes],
        "portfolios": found["portfolios"],
        "transactions": found["transactions"],
        "applied": [(q, i, spelled, str(txn) if txn else None, status) for q, i, spelled, txn, status in applied],
        "parked": [(q, i, reason, attempts, status) for q, i, _, _, status, _, reason, attempts in parked],
        "corrections": [(q, i, was, now) for q, i, _, was, now in corrections],
    }


@pytest.mark.parametrize("factor_set", sorted(FACTOR_SETS))
@pytest.mark.parametrize("seed", range(4))
def test_the_steps_do_what_apply_batch_v2_does(pg: str, templates: tuple[str, str], seed: int, factor_set: str) -> None:
    """Same batches, same databases: the same outcomes, money, statuses, records, parking reasons and corrections."""
    old = outcome_and_state(pg, templates[1], seed, factor_set, apply_with_v2)
    new = outcome_and_state(pg, templates[1], seed, factor_set, apply_entries)

    assert new == old
    assert seen_state(new) == model_outcome_and_state(seed, factor_set)  # and both do what the model does
    outcomes = Counter(key for counts in old["outcomes"] for key in counts)  # type: ignore[union-attr]
    assert {"COMPLETED", "FAILED", "CANCELLED", "parked"} <= set(outcomes)


def test_settle_refuses_a_batch_whose_transaction_is_not_where_check_took_it(world: World) -> None:
    # The transactions check_batch_v3 took cannot move while the batch's transaction holds them; were one ever
    # not found where it was taken, the batch must fail, not settle without it.
    from apply import step_params
    from queries import query
    from tiers import load

    world.portfolio_for(ACCOUNT)
    request = world.request("investment", ACCOUNT)
    (row,) = world.q("SELECT queue_id, account_number, uuid, status, updated_at FROM investment_queue")
    before = world.amounts(ACCOUNT)
    conn = psycopg2.connect(world.portfolio_uri)
    try:
        with conn.cursor() as cur:
            params = step_params(INVESTMENT, [t.invest_factor for t in load(cur)], STAMP, False)
            load_entries(cur, [Entry(*row)])
            cur.execute(query("claim_batch"), params)
            cur.execute(query("check_batch"), params)
            cur.execute("UPDATE pg_temp.cm_taken_transactions SET row_id = '(0,0)'")
            cur.execute(query("compound_batch"), params)
            with pytest.raises(psycopg2.DataError, match="mirrored 0 of the 1 portfolio transactions"):
                cur.execute(query("settle_batch"), params)
    finally:
        conn.rollback()
        conn.close()
    assert (world.txn_status(request.uuid), world.applied(), world.amounts(ACCOUNT)) == ("PENDING", 0, before)


class CleanScenario(Scenario):
    """Entries that can each apply when first read: their own transactions, spelled every way, and portfolios."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.accounts = [f"10000000{n:02d}" for n in range(5)]
        self.portfolios = {a: AMOUNTS[0] for a in self.accounts}
        self.transactions = []
        self.entries = {queue.name: self._clean_entries(queue, 40) for queue in (INVESTMENT, WITHDRAWAL)}

    def _clean_entries(self, queue: Queue, count: int) -> list[Entry]:
        """Settled entries of one queue, each naming a transaction of its own account and of the queue's type."""
        entries = []
        for n in range(1, count + 1):
            account = self.rng.choice(self.accounts)
            txn = str(uuidlib.UUID(int=self.rng.getrandbits(128)))
            self.transactions.append((txn, account, queue.transaction_type))
            spelled = self.rng.choice(SPELLINGS)(txn)
            status = self.rng.choice(["COMPLETED", "COMPLETED", "FAILED", "CANCELLED"])
            entries.append(Entry(n, account, spelled, status, T0 + timedelta(seconds=n // 2)))
        return entries


def apply_carefully(cur, queue, entries, factors, retrying=False):
    """Load entries and apply them by the careful steps alone, as the service did before the clean way."""
    load_entries(cur, entries)
    return +run_steps(cur, step_params(queue, factors, STAMP, retrying), CAREFUL_STEPS)


@pytest.mark.parametrize("factor_set", sorted(FACTOR_SETS))
@pytest.mark.parametrize("seed", range(2))
def test_the_clean_way_ends_every_batch_as_the_careful_steps_end_it(
    pg: str, templates: tuple[str, str], seed: int, factor_set: str, mocker
) -> None:
    """Clean batches, then batches made unclean by corrections and steps that overflow: the same end, journal too."""
    state = {**STATE, "journal": JOURNAL}
    careful = outcome_and_state(pg, templates[1], seed, factor_set, apply_carefully, CleanScenario, state)
    tries = mocker.spy(apply, "_try_clean")
    service = outcome_and_state(pg, templates[1], seed, factor_set, apply_entries, CleanScenario, state)

    assert service == careful
    assert seen_state(service) == model_outcome_and_state(seed, factor_set, CleanScenario)
    assert len(careful["journal"]) >= 80  # type: ignore[arg-type]
    taken = [outcome is not None for outcome in tries.spy_return_list]
    assert taken.count(True) >= 2 and False in taken  # the clean way applied batches, and refused others


def test_the_clean_way_takes_a_clean_batch_and_refuses_one_that_is_not(world: World) -> None:
    from tiers import load

    world.portfolio_for(ACCOUNT)
    requests = [world.request("investment", ACCOUNT) for _ in range(3)]
    rows = world.q("SELECT queue_id, account_number, uuid, status, updated_at FROM investment_queue ORDER BY queue_id")
    conn = psycopg2.connect(world.portfolio_uri, options="-c lock_timeout=5s")
    holder = psycopg2.connect(world.portfolio_uri)
    try:
        with conn.cursor() as cur:
            params = step_params(INVESTMENT, [t.invest_factor for t in load(cur)], STAMP, False)
            load_entries(cur, [Entry(*rows[0])])
            assert apply._try_clean(cur, params) == Counter({"COMPLETED": 1})
            cur.execute("SELECT count(*) FROM pg_temp.cm_taken_transactions")
            assert cur.fetchone() == (0,)  # the clean way takes no transaction ahead of its update

            with holder.cursor() as other:  # another session holds the second entry's transaction
                other.execute("SELECT 1 FROM portfolio_transactions WHERE id = %s FOR UPDATE", (requests[1].uuid,))
            load_entries(cur, [Entry(*rows[1])])
            assert apply._try_clean(cur, params) is None
            cur.execute("SELECT current_setting('lock_timeout'), count(*) FROM pg_temp.cm_batch")
            assert cur.fetchone() == ("5s", 1)  # the try is undone, and the session's own wait is back

            world.p("DELETE FROM portfolio_transactions WHERE id = %s", (requests[2].uuid,))
            load_entries(cur, [Entry(*rows[2])])
            assert apply._try_clean(cur, params) is None
            assert run_steps(cur, params, CAREFUL_STEPS) == Counter({"parked": 1})
            cur.execute("SELECT reason FROM pg_temp.cm_batch")
            assert cur.fetchone() == ("no portfolio transaction with this id",)
    finally:
        holder.rollback()
        holder.close()
        conn.rollback()
        conn.close()
    assert world.txn_status(requests[0].uuid) == "PENDING"  # nothing of the rolled-back transaction stays


def test_the_claim_gathers_the_batch_statistics_again_only_for_a_batch_of_another_size(world: World) -> None:
    from queries import query

    conn = psycopg2.connect(world.portfolio_uri)
    seen, first = [], 1
    try:
        for size in (10, 15, 40, 12):
            entries = [Entry(n, ACCOUNT, str(uuidlib.uuid4()), "FAILED", T0) for n in range(first, first + size)]
            first += size
            with conn, conn.cursor() as cur:
                load_entries(cur, entries)
                cur.execute(query("claim_batch"), step_params(INVESTMENT, FACTORS, STAMP, False))
                cur.execute("SELECT reltuples FROM pg_class WHERE oid = 'pg_temp.cm_batch'::regclass")
                seen.append(cur.fetchone()[0])
    finally:
        conn.close()
    assert seen == [10, 10, 40, 12]  # 15 is within twice 10; 40 is not, nor 12 within half of 40
