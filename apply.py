"""Applies one batch of queue entries to user-portfolio-db, exactly once, parking what cannot apply."""

from __future__ import annotations

import re
import uuid as uuidlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

import psycopg2
import psycopg2.extensions

from db import pg_array
from money import AMOUNT_LIMIT, scale
from queries import query

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
# A queue entry's outcome becomes the portfolio transaction's status.
MIRRORED_STATUS = {"COMPLETED": "PROCESSED", "FAILED": "FAILED", "CANCELLED": "CANCELLED"}

Amounts = tuple[Decimal, Decimal, Decimal]


@dataclass(frozen=True)
class Queue:
    """A queue table of queue-db and what its completed entries change in a portfolio."""

    name: str
    table: str
    transaction_type: str
    portfolio_columns: str  # "values" or "allocations"


INVESTMENT = Queue("investment", "investment_queue", "INVEST", "values")
WITHDRAWAL = Queue("withdrawal", "withdrawal_queue", "WITHDRAWAL", "allocations")
QUEUES = (INVESTMENT, WITHDRAWAL)


@dataclass(frozen=True)
class Entry:
    """One queue row as the service reads it."""

    queue_id: int
    account_number: str | None
    uuid: str | None
    status: str | None
    updated_at: datetime

    @property
    def position(self) -> tuple[datetime, int]:
        """Return where the entry sits in (updated_at, queue_id) order."""
        return (self.updated_at, self.queue_id)


@dataclass(frozen=True)
class Transaction:
    """The parts of a portfolio_transactions row the service checks."""

    accountid: str
    transaction_type: str


@dataclass
class Plan:
    """What applying a batch does: entries applied, entries parked, and new portfolio amounts."""

    applied: list[Entry] = field(default_factory=list)
    parked: list[tuple[Entry, str]] = field(default_factory=list)
    amounts: dict[str, Amounts] = field(default_factory=dict)

    def counts(self) -> Counter[str]:
        """Count the batch's outcomes: one key per applied status, plus 'parked'."""
        counts = Counter(entry.status for entry in self.applied)
        counts["parked"] += len(self.parked)
        return counts


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_uuid(text: str | None) -> str | None:
    """Return a queue entry's uuid in PostgreSQL's text form, or None if it is not a UUID."""
    if text is not None and _CANONICAL_UUID.fullmatch(text):
        return text  # the usual form, checked without building a UUID
    try:
        return str(uuidlib.UUID(text))
    except (ValueError, AttributeError, TypeError):
        return None


def plan_batch(
    queue: Queue,
    entries: Sequence[Entry],
    transactions: dict[str, Transaction],
    portfolios: dict[str, Amounts],
    factors: tuple[Fraction, Fraction, Fraction],
) -> Plan:
    """Decide each entry's fate in order, compounding completed entries on their account's amounts."""
    plan = Plan()
    amounts = dict(portfolios)
    for entry in entries:
        reason = _blocker(queue, entry, transactions, amounts)
        if reason is None and entry.status == "COMPLETED":
            new = tuple(
                scale(amount, factor) for amount, factor in zip(amounts[entry.account_number], factors, strict=True)
            )
            reason = _amount_problem(new)  # type: ignore[arg-type]
            if reason is None:
                amounts[entry.account_number] = new  # type: ignore[assignment]
                plan.amounts[entry.account_number] = new  # type: ignore[assignment]
        if reason is None:
            plan.applied.append(entry)
        else:
            plan.parked.append((entry, reason))
    return plan


def _blocker(
    queue: Queue, entry: Entry, transactions: dict[str, Transaction], amounts: dict[str, Amounts]
) -> str | None:
    """Return why an entry cannot be applied now, or None."""
    if entry.status == "COMPLETED" and entry.account_number not in amounts:
        return f"no portfolio for account {entry.account_number}"
    entry_id = canonical_uuid(entry.uuid)
    if entry_id is None:
        return "uuid is not a valid UUID"
    txn = transactions.get(entry_id)
    if txn is None:
        return "no portfolio transaction with this id"
    if txn.accountid != entry.account_number:
        return f"portfolio transaction belongs to account {txn.accountid}"
    if txn.transaction_type != queue.transaction_type:
        return f"portfolio transaction is {txn.transaction_type}, expected {queue.transaction_type}"
    return None


def _amount_problem(amounts: Amounts) -> str | None:
    """Return why new tier amounts cannot be stored, or None."""
    if any(amount < 0 for amount in amounts):
        return "result would be negative"
    if sum(amounts) >= AMOUNT_LIMIT:
        return "result would overflow NUMERIC(15,2)"
    return None


def apply_batch(
    cur: psycopg2.extensions.cursor,
    queue: Queue,
    entries: Sequence[Entry],
    factors: tuple[Fraction, Fraction, Fraction],
    retrying: bool = False,
) -> Counter[str]:
    """Apply a batch's terminal entries once each, in the caller's transaction, and count outcomes.

    Parked entries are left to the parked retry (retrying=True), which reads their rows afresh.
    """
    terminal = [e for e in entries if e.status in TERMINAL]
    if not terminal:
        return Counter()
    claimed = _claim(cur, queue, terminal, retrying)
    todo = [e for e in terminal if e.queue_id in claimed]
    if not todo:
        return Counter()
    plan = plan_batch(queue, todo, _transactions(cur, todo), _lock_portfolios(cur, queue, todo), factors)
    _write(cur, queue, plan)
    return plan.counts()


def apply_one_by_one(
    cur: psycopg2.extensions.cursor,
    queue: Queue,
    entries: Sequence[Entry],
    factors: tuple[Fraction, Fraction, Fraction],
    retrying: bool = False,
) -> Counter[str]:
    """Apply entries one at a time, parking any the database itself rejects."""
    counts: Counter[str] = Counter()
    for entry in entries:
        cur.execute(query("savepoint"))
        try:
            counts += apply_batch(cur, queue, [entry], factors, retrying)
        except (psycopg2.IntegrityError, psycopg2.DataError) as err:
            cur.execute(query("rollback_to_savepoint"))
            detail = err.diag.message_primary or type(err).__name__
            park(cur, queue, [(entry, f"rejected by the database: {detail}")])
            counts["parked"] += 1
        cur.execute(query("release_savepoint"))
    return counts


def _claim(cur: psycopg2.extensions.cursor, queue: Queue, entries: list[Entry], retrying: bool) -> set[int]:
    """Record entries as applied; return the queue_ids this transaction recorded first."""
    cur.execute(
        query("claim_entries"),
        {
            "queue": queue.name,
            "retrying": retrying,
            "uuids": pg_array(e.uuid for e in entries),
            "queue_ids": pg_array(e.queue_id for e in entries),
            "statuses": pg_array(e.status for e in entries),
        },
    )
    return {row[0] for row in cur.fetchall()}


def _transactions(cur: psycopg2.extensions.cursor, entries: list[Entry]) -> dict[str, Transaction]:
    """Fetch the portfolio transactions of the entries, by normalised id."""
    ids = [entry_id for entry_id in map(canonical_uuid, (e.uuid for e in entries)) if entry_id]
    cur.execute(query("select_transactions"), {"ids": pg_array(ids)})
    return {row[0]: Transaction(row[1], row[2]) for row in cur.fetchall()}


def _lock_portfolios(cur: psycopg2.extensions.cursor, queue: Queue, entries: list[Entry]) -> dict[str, Amounts]:
    """Lock the portfolios of the completed entries and return the amounts the queue changes."""
    accounts = sorted({e.account_number for e in entries if e.status == "COMPLETED"})
    if not accounts:
        return {}
    cur.execute(query("lock_portfolios"), {"accounts": pg_array(accounts)})
    columns = slice(1, 4) if queue.portfolio_columns == "values" else slice(4, 7)
    return {row[0]: tuple(row[columns]) for row in cur.fetchall()}  # type: ignore[misc]


def _write(cur: psycopg2.extensions.cursor, queue: Queue, plan: Plan) -> None:
    """Store a plan: release and park the blocked entries, mirror statuses, update portfolios."""
    if plan.parked:
        parked_ids = pg_array(e.queue_id for e, _ in plan.parked)
        cur.execute(query("unclaim_entries"), {"queue": queue.name, "queue_ids": parked_ids})
        park(cur, queue, plan.parked)
    if plan.applied:
        applied_ids = pg_array(e.queue_id for e in plan.applied)
        cur.execute(query("unpark_entries"), {"queue": queue.name, "queue_ids": applied_ids})
        cur.execute(
            query("mirror_transaction_status"),
            {
                "ids": pg_array(canonical_uuid(e.uuid) for e in plan.applied),
                "statuses": pg_array(MIRRORED_STATUS[e.status] for e in plan.applied),
            },
        )
    if plan.amounts:
        accounts = sorted(plan.amounts)
        cur.execute(
            query(f"update_portfolio_{queue.portfolio_columns}"),
            {
                "accounts": pg_array(accounts),
                **{f"t{n}": pg_array(plan.amounts[a][n - 1] for a in accounts) for n in (1, 2, 3)},
            },
        )


def park(cur: psycopg2.extensions.cursor, queue: Queue, parked: list[tuple[Entry, str]]) -> None:
    """Keep entries that cannot be applied yet, with their reasons."""
    cur.execute(
        query("park_entries"),
        {
            "queue": queue.name,
            "uuids": pg_array(e.uuid for e, _ in parked),
            "queue_ids": pg_array(e.queue_id for e, _ in parked),
            "accounts": pg_array(e.account_number for e, _ in parked),
            "statuses": pg_array(e.status for e, _ in parked),
            "updated": pg_array(e.updated_at for e, _ in parked),
            "reasons": pg_array(reason for _, reason in parked),
        },
    )
