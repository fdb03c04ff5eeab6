"""Why a portfolio shows what it shows: its amounts now, the journal records that changed them, and whether the
amounts now are still those the last completed entry of each queue left."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import psycopg2.extensions

import journal
import tiers
from db import Database, one_row
from domain import INVESTMENT, QUEUES, WITHDRAWAL, Queue
from queries import query

# How many of an account's newest journal records are read, at most, to find the last completed entry of each queue.
RECORDS_READ_MAX = 10_000

# What a comparison of the amounts now with the last completed entry's tells.
Agreement = Literal["equal", "differs", "no_record", "not_in_recent_records", "no_portfolio"]
QUEUE_BY_NAME = {queue.name: queue for queue in QUEUES}


def labels(queue: Queue) -> tuple[str, ...]:
    """Return the portfolio columns a completed entry of this queue changes: tier values or tier allocations."""
    column = queue.portfolio_columns.removesuffix("s")
    return tuple(f"tier{n}_{column}" for n in (1, 2, 3))


def total_label(queue: Queue) -> str:
    """Return the portfolio column that sums the tiers a completed entry of this queue changes."""
    return f"total_{queue.portfolio_columns.removesuffix('s')}"


AMOUNTS = (*labels(INVESTMENT), total_label(INVESTMENT), *labels(WITHDRAWAL), total_label(WITHDRAWAL))


@dataclass(frozen=True)
class Standing:
    """An account's portfolio amounts now (None without a portfolio) and what its newest journal records hold."""

    amounts: dict[str, Decimal] | None
    updated_at: datetime | None
    records_read: int
    last_completed: dict[str, int]  # the newest completed record's id, by queue name

    @classmethod
    def read(cls, cur: psycopg2.extensions.cursor, account: str) -> Standing:
        """Read the portfolio and, along the journal's index, the newest completed record of each queue."""
        params = {"account": account, "scan": RECORDS_READ_MAX, "investment": INVESTMENT.name,
                  "withdrawal": WITHDRAWAL.name}  # fmt: skip
        cur.execute(query("portfolio_standing"), params)
        *shown, updated_at, records_read, last_investment, last_withdrawal = one_row(cur)
        amounts = None if updated_at is None else dict(zip(AMOUNTS, shown, strict=True))
        last = {INVESTMENT.name: last_investment, WITHDRAWAL.name: last_withdrawal}
        return cls(
            amounts, updated_at, records_read, {name: record for name, record in last.items() if record is not None}
        )


@dataclass(frozen=True)
class Comparison:
    """Whether one kind of amounts (values or allocations) is still what the last completed entry left."""

    queue: Queue
    agreement: Agreement
    finding: str
    record: dict[str, Any] | None = None
    differences: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the comparison as the portfolio read shows it."""
        equal = {"equal": True, "differs": False}.get(self.agreement)
        return {"queue": self.queue.name, "agreement": self.agreement, "equal": equal, "finding": self.finding,
                "record": self.record, "differences": self.differences}  # fmt: skip


def explain_portfolio(portfolio_db: Database, account: str, limit: int, before: int | None) -> dict[str, Any] | None:
    """Tell why an account's portfolio shows what it does; None if it has neither a portfolio nor a journal record.

    Its amounts now; its journal records, newest first, `limit` at a time below the id `before`; and, per kind of
    amounts, whether they are still those after the newest completed entry that changed them. One snapshot.
    """
    with portfolio_db.transaction() as cur:
        cur.execute(query("read_snapshot"))
        cur.execute(query("page_plan"))
        standing = Standing.read(cur, account)
        if standing.amounts is None and standing.records_read == 0:
            return None
        page = journal.account_page(cur, account, limit, before)
        ids = sorted(standing.last_completed.values())
        lasts = journal.account_page(cur, account, len(ids), None, ids)["entries"] if ids else []
        in_force = journal.tiers_at(cur, (r["tier_version"] for r in [*page["entries"], *lasts]))
    last = {record["queue"]: labelled(record, in_force) for record in lasts}
    return {
        "account": account,
        "portfolio": _shown(standing),
        "agreement": {
            queue.portfolio_columns: compare(queue, account, standing, last.get(queue.name)).to_json()
            for queue in QUEUES
        },
        "entries": [labelled(record, in_force) for record in page["entries"]],
        "next_before": page["next_before"],
    }


def labelled(record: dict[str, Any], in_force: dict[int, tiers.Tiers]) -> dict[str, Any]:
    """Name a record's amounts before and after by the portfolio columns they are, with the factor applied to each."""
    queue = QUEUE_BY_NAME.get(record["queue"])
    if queue is None or record["after"] is None:
        return {**record, "factors": None}
    names = labels(queue)
    values = in_force.get(record["tier_version"])
    factors = None if values is None else [tiers.shown_fraction(f) for f in tiers.factors_for(queue, values)]
    return {
        **record,
        "before": dict(zip(names, record["before"], strict=True)),
        "after": dict(zip(names, record["after"], strict=True)),
        "factors": None if factors is None else dict(zip(names, factors, strict=True)),
    }


def compare(queue: Queue, account: str, standing: Standing, record: dict[str, Any] | None) -> Comparison:
    """Compare the amounts a queue's entries change, now, with those after its newest completed record."""
    kind = queue.portfolio_columns
    if standing.amounts is None:
        return Comparison(queue, "no_portfolio", f"account {account} has no portfolio")
    if record is None:
        if standing.records_read >= RECORDS_READ_MAX:
            finding = f"no completed {queue.name} among the account's newest {RECORDS_READ_MAX} journal records"
            return Comparison(queue, "not_in_recent_records", f"{finding}: the {kind} are not compared")
        finding = f"no completed {queue.name} in the account's journal: this service has never changed its {kind}"
        return Comparison(queue, "no_record", finding)
    now = {name: standing.amounts[name] for name in labels(queue)}
    differences = {
        name: {"now": str(amount), "after": record["after"][name]}
        for name, amount in now.items()
        if amount != Decimal(record["after"][name])
    }
    entry = f"{queue.name} entry {record['queue_id']} (journal record {record['id']} at {record['at']})"
    if not differences:
        return Comparison(queue, "equal", f"the {kind} are those after {entry}", record)
    told = "; ".join(f"{name} is {d['now']}, {d['after']} after it" for name, d in differences.items())
    finding = f"the {kind} differ from those after {entry}, the last entry that changed them: {told}"
    return Comparison(
        queue, "differs", f"{finding}; something other than this service changed them", record, differences
    )


def _shown(standing: Standing) -> dict[str, Any] | None:
    """Show the portfolio's amounts now as strings, and when it was last updated; None without a portfolio."""
    if standing.amounts is None:
        return None
    shown: dict[str, Any] = {name: str(amount) for name, amount in standing.amounts.items()}
    shown["updated_at"] = None if standing.updated_at is None else standing.updated_at.isoformat()
    return shown
