"""Factories that build queue and portfolio data the way the other services do, and read it back."""

from __future__ import annotations

import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import psycopg2
import psycopg2.extensions

from domain import Stamp

TABLES = {"investment": "investment_queue", "withdrawal": "withdrawal_queue"}
# What entries applied by a test directly, outside a cycle, name in the journal.
STAMP = Stamp(cycle=1, tier_version=1)
TYPES = {"investment": "INVEST", "withdrawal": "WITHDRAWAL"}


@dataclass
class Request:
    """One investment or withdrawal as both databases know it."""

    queue: str
    queue_id: int
    uuid: str
    account: str


class OpenWriter:
    """A queue-db transaction that has settled a request and not committed yet: a late commit."""

    def __init__(self, queue_uri: str, request: Request, status: str) -> None:
        self.conn = psycopg2.connect(queue_uri)
        with self.conn.cursor() as cur:
            cur.execute(
                f"UPDATE {TABLES[request.queue]} SET status = %s WHERE queue_id = %s RETURNING updated_at",
                (status, request.queue_id),
            )
            self.updated_at = cur.fetchone()[0]

    def commit(self) -> None:
        """Commit, late."""
        self.conn.commit()
        self.conn.close()

    def rollback(self) -> None:
        """Roll back: the settlement never happened."""
        self.conn.rollback()
        self.conn.close()


class World:
    """Direct connections to a test's two databases, with helpers that tell the test's story."""

    def __init__(self, queue_uri: str, portfolio_uri: str) -> None:
        self.queue_uri = queue_uri
        self.portfolio_uri = portfolio_uri
        # A lock wait that never ends would hang the run; 20 s is far beyond any test's need.
        self.queue = psycopg2.connect(queue_uri, options="-c lock_timeout=20000")
        self.queue.autocommit = True
        self.portfolio = psycopg2.connect(portfolio_uri, options="-c lock_timeout=20000")
        self.portfolio.autocommit = True

    def close(self) -> None:
        """Close both connections."""
        self.queue.close()
        self.portfolio.close()

    def q(self, sql: str, params: Any = None) -> list[tuple]:
        """Run a statement on queue-db and return its rows, if any."""
        with self.queue.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def p(self, sql: str, params: Any = None) -> list[tuple]:
        """Run a statement on user-portfolio-db and return its rows, if any."""
        with self.portfolio.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def portfolio_for(
        self,
        account: str,
        values: tuple[str, str, str] = ("1000.00", "2000.00", "3000.00"),
        allocations: tuple[str, str, str] = ("100.00", "200.00", "300.00"),
    ) -> None:
        """Open a portfolio, as the portfolio service does."""
        v = [Decimal(x) for x in values]
        a = [Decimal(x) for x in allocations]
        self.p(
            "INSERT INTO user_portfolios (accountid, tier1_allocation, tier2_allocation, tier3_allocation,"
            " total_allocation, tier1_value, tier2_value, tier3_value, total_value)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (account, *a, sum(a), *v, sum(v)),
        )

    def transaction_for(self, queue: str, account: str, entry_uuid: str | None = None) -> str:
        """Record a PENDING portfolio transaction, as the portfolio service does; return its id."""
        entry_uuid = entry_uuid or str(uuidlib.uuid4())
        self.p(
            "INSERT INTO portfolio_transactions (id, accountid, transaction_type, total_amount)"
            " VALUES (%s, %s, %s, 100)",
            (entry_uuid, account, TYPES[queue]),
        )
        return entry_uuid

    def enqueue(self, queue: str, account: str, entry_uuid: str | None = None, txn: bool = True) -> Request:
        """Queue a PENDING request, with its portfolio transaction unless txn is False."""
        entry_uuid = entry_uuid or str(uuidlib.uuid4())
        if txn:
            self.transaction_for(queue, account, entry_uuid)
        rows = self.q(
            f"INSERT INTO {TABLES[queue]} (account_number, tier_1, tier_2, tier_3, uuid)"
            " VALUES (%s, 10, 20, 30, %s) RETURNING queue_id",
            (account, entry_uuid),
        )
        return Request(queue, rows[0][0], entry_uuid, account)

    def finish(self, request: Request, status: str = "COMPLETED") -> Request:
        """Move a queued request to a new status, as user-request-queue-svc does."""
        self.q(
            f"UPDATE {TABLES[request.queue]} SET status = %s, processed_at = now() WHERE queue_id = %s",
            (status, request.queue_id),
        )
        return request

    def finish_uncommitted(self, request: Request, status: str = "COMPLETED") -> OpenWriter:
        """Settle a request in a writer transaction that stays open until the test ends it."""
        return OpenWriter(self.queue_uri, request, status)

    def request(self, queue: str, account: str, status: str = "COMPLETED", txn: bool = True) -> Request:
        """Queue a request and take it straight to a status."""
        return self.finish(self.enqueue(queue, account, txn=txn), status)

    def amounts(self, account: str) -> dict[str, Decimal]:
        """Read a portfolio's tiers and totals."""
        with self.portfolio.cursor() as cur:
            cur.execute(
                "SELECT tier1_value, tier2_value, tier3_value, total_value, tier1_allocation,"
                " tier2_allocation, tier3_allocation, total_allocation FROM user_portfolios WHERE accountid = %s",
                (account,),
            )
            row = cur.fetchone()
            return dict(zip([c.name for c in cur.description], row, strict=True))

    def txn_status(self, entry_uuid: str) -> str:
        """Read a portfolio transaction's status."""
        return self.p("SELECT status FROM portfolio_transactions WHERE id = %s", (entry_uuid,))[0][0]

    def applied(self) -> int:
        """Count the entries recorded as applied."""
        return self.p("SELECT count(*) FROM consistency.applied_entries")[0][0]

    def parked(self) -> dict[str, str]:
        """Return the parked entries' reasons by uuid."""
        return dict(self.p("SELECT uuid, reason FROM consistency.parked_entries"))

    @contextmanager
    def cycle_lease_held(self) -> Iterator[None]:
        """Have another process hold the cycle lease for the block, as a replica in the middle of a cycle does."""
        self.p(
            "UPDATE consistency.cycle_lease SET holder = 'elsewhere:1:2', backend_pid = pg_backend_pid(),"
            " epoch = epoch + 1, renewed_at = now(), expires_at = now() + interval '1 hour'"
        )
        try:
            yield
        finally:
            self.p("UPDATE consistency.cycle_lease SET holder = NULL, expires_at = now()")

    def set_tiers(self, **values: str) -> None:
        """Change stored tier values directly, e.g. set_tiers(TIER1_MV='1100000')."""
        for key, value in values.items():
            tier = int(key[4])
            column = "market" if key.endswith("_MV") else "pool"
            self.p(f"UPDATE consistency.tier_values SET {column} = %s WHERE tier = %s", (value, tier))


def expected(amount: str | Decimal, *factors: tuple[str, str]) -> Decimal:
    """The oracle: apply factors (numerator, denominator) one at a time at 200 digits, rounding half up."""
    value = Decimal(amount)
    with localcontext() as ctx:
        ctx.prec = 200
        for num, den in factors:
            value = (value * Decimal(num) / Decimal(den)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return value


def claim_raced(uri: str, first: Callable[[Any], object], second: Callable[[Any], dict]) -> dict:
    """Run `first` in a transaction left open, and `second` on another connection: check that the second
    waits for the first (on the unique record of a transaction), commit the first, and return what the
    second counted."""
    holder = psycopg2.connect(uri)
    with holder.cursor() as cur:
        first(cur)
    outcome: dict = {}

    def other_process() -> None:
        conn = psycopg2.connect(uri)
        with conn, conn.cursor() as cur:
            outcome.update(second(cur))
        conn.close()

    racer = threading.Thread(target=other_process)
    racer.start()
    racer.join(timeout=1)
    assert racer.is_alive()  # it waits on the unique record of the transaction
    holder.commit()
    holder.close()
    racer.join(timeout=10)
    return outcome
