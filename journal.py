"""The journal for the API: one account's records, newest first, and one entry's whole story."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import psycopg2.extensions

import tiers
from db import Database, fetch_page, json_rows, one_row, pg_array, plain
from domain import OPEN, Entry, Queue, transaction_id
from queries import query, table_query

# What a journal record tells of its entry.
APPLIED = "applied"  # the cycle applied it: its outcome, and the tier amounts before and after
PARKED = "parked"  # it could not apply (its queue row deleted, too): a parking started, or its reason changed
RELEASED = "released"  # its queue row was open again, so it left the parked list
CORRECTED = "corrected"  # the queue changed its status after it was applied
AGREES_AGAIN = "agrees_again"  # the queue's status is back to the one applied
RETRIED = "retried"  # an operator asked for a retry
RESOLVED = "resolved"  # an operator dismissed it: it is never applied
ADOPTED = "adopted"  # recorded as applied without moving money, by the baseline action or INITIAL_WATERMARK
REUSED = "reused"  # its queue row, applied before under another transaction, came to carry this one: a new entry
KINDS = (APPLIED, PARKED, RELEASED, CORRECTED, AGREES_AGAIN, RETRIED, RESOLVED, ADOPTED, REUSED)


def record(
    cur: psycopg2.extensions.cursor,
    queue: str,
    queue_id: int,
    kind: str,
    *,
    account: str | None = None,
    status: str | None = None,
    reason: str | None = None,
    attempts: int | None = None,
    actor: str | None = None,
    cycle: int | None = None,
) -> None:
    """Write one record against an entry, in the caller's transaction."""
    if kind not in KINDS:
        raise ValueError(f"unknown journal kind {kind!r}")
    params = {"queue": queue, "queue_id": queue_id, "kind": kind, "account": account, "status": status}
    cur.execute(
        query("insert_journal_record"),
        {**params, "reason": reason, "attempts": attempts, "actor": actor, "cycle": cycle},
    )


# An entry's story lists at most this many records; one that changes more often than that is a case for a person.
STORY_RECORDS_MAX = 1000


class Journal:
    """Reads the journal for the API."""

    def __init__(self, queue_db: Database, portfolio_db: Database) -> None:
        self.queue_db = queue_db
        self.portfolio_db = portfolio_db

    def account(self, account: str, limit: int, before: int | None) -> dict[str, Any]:
        """List one account's records, newest first, `limit` at a time, below the id `before` when given."""
        with self.portfolio_db.transaction() as cur:
            cur.execute(query("page_plan"))  # the account's records along journal_account, never all of them sorted
            page = account_page(cur, account, limit, before)
        return {"account": account, **page}

    def story(self, queue: Queue, queue_id: int) -> dict[str, Any] | None:
        """Tell the whole story of one entry: its queue row now, where it stands, and every record; None if unknown."""
        with self.queue_db.transaction() as qcur:
            qcur.execute(table_query("queue_select_by_id", queue.table), {"queue_ids": [queue_id]})
            row = qcur.fetchone()
        key = {"queue": queue.name, "queue_id": queue_id}
        entry = None if row is None else Entry(*row)
        with self.portfolio_db.transaction() as cur:
            cur.execute(query("entry_standing"), key)
            ledgers, parked, resolved, correction, reuses = one_row(cur)
            ledgers, reuses = ledgers or [], reuses or []
            # Its records are filed under the accounts it named: in the queue, its transactions, its parking.
            named = [entry.account_number if entry else None] + [
                p["account_number"] for p in (*ledgers, *reuses, parked, resolved) if p
            ]
            accounts = {"accounts": sorted({a for a in named if a is not None}), "no_account": None in named}
            cur.execute(query("entry_journal"), {**key, **accounts, "limit": STORY_RECORDS_MAX})
            records = json_rows(cur)
            in_force = {v: _in_force(queue, t) for v, t in tiers_at(cur, {r["tier_version"] for r in records}).items()}
        if row is None and not records and not ledgers and parked is None and resolved is None:
            return None
        for record in records:
            record["tiers_in_force"] = in_force.get(record["tier_version"])
        ledger = _ledger_now(entry, ledgers)
        if resolved is not None and entry is not None and not _carries(entry, resolved["uuid"]):
            resolved = None  # resolved while the row carried another transaction: this one is another entry
        return {
            **key,
            "state": _state(entry, ledger, parked, resolved),
            "queue_row": None if entry is None else {k: plain(v) for k, v in asdict(entry).items()},
            "ledger": ledger,
            "parked": parked,
            "resolved": resolved,
            "correction": correction,
            "transactions": _transactions(entry, ledgers, reuses, parked),
            "reuses": reuses,
            "records": records,
        }


def account_page(
    cur: psycopg2.extensions.cursor, account: str, limit: int, before: int | None, ids: list[int] | None = None
) -> dict[str, Any]:
    """Read a page of one account's records, newest first, below the id `before` (of the given ids, when given)."""
    params = {"account": account, "before": before, "ids": None if ids is None else pg_array(ids)}
    return fetch_page(cur, "list_account_journal", params, limit)


def tiers_at(cur: psycopg2.extensions.cursor, versions: Iterable[int | None]) -> dict[int, tiers.Tiers]:
    """Return the tier values each tier_value_history id names, in one statement; an id that names none is left out."""
    wanted = sorted({v for v in versions if v is not None})
    if not wanted:
        return {}
    cur.execute(query("tier_values_at_versions"), {"versions": pg_array(wanted)})
    found: dict[int, list[tiers.Tier]] = {}
    for version, _, pool, market in cur.fetchall():
        found.setdefault(version, []).append(tiers.Tier(pool, market))
    return {version: tuple(values) for version, values in found.items() if len(values) == 3}


def _in_force(queue: Queue, values: tiers.Tiers) -> dict[str, Any]:
    """Describe tier values in force, and the factors a completed entry of `queue` applied under them."""
    factors = [tiers.shown_fraction(f) for f in tiers.factors_for(queue, values)]
    return {**tiers.tiers_json(values), "factors": factors}


def _carries(entry: Entry, uuid: str | None) -> bool:
    """Tell whether a queue row carries the transaction a uuid names (or the same text, when it names none)."""
    txn = transaction_id(uuid)
    return entry.transaction == txn if txn is not None else entry.uuid == uuid


def _ledger_now(entry: Entry | None, ledgers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ledger record of the transaction the row carries now (of its latest application, if the row is gone)."""
    if entry is None:
        return ledgers[-1] if ledgers else None
    mine = [r for r in ledgers if r["portfolio_transaction"] in (None, entry.transaction)]
    return mine[-1] if mine else None


def _transactions(
    entry: Entry | None, ledgers: list[dict[str, Any]], reuses: list[dict[str, Any]], parked: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Every portfolio transaction the row has carried, as far as the service saw, oldest first, and which applied."""
    seen: dict[str | None, dict[str, Any]] = {}

    def note(txn: str | None, uuid: str | None) -> None:
        seen.setdefault(txn, {"portfolio_transaction": txn, "uuid": uuid, "applied": False})

    for reuse in reuses:
        note(reuse["earlier_transaction"], None)
        note(reuse["portfolio_transaction"], reuse["uuid"])
    for record in ledgers:
        note(record["portfolio_transaction"], record["uuid"] or record["portfolio_transaction"])
        seen[record["portfolio_transaction"]].update(
            applied=True, applied_status=record["status"], applied_at=record["applied_at"]
        )
    if parked is not None:
        note(transaction_id(parked.get("uuid")), parked.get("uuid"))
    if entry is not None:
        note(entry.transaction, entry.uuid)
    for txn, shown in seen.items():
        shown["carried_now"] = entry is not None and txn == entry.transaction
    return list(seen.values())


def _state(entry: Entry | None, ledger: Any, parked: Any, resolved: Any) -> str:
    """Name where an entry stands: applied, parked, resolved, open (not settled yet), or not applied yet."""
    if resolved is not None:
        return "resolved"
    if ledger is not None:
        return "applied"
    if parked is not None:
        return "parked"
    if entry is not None and entry.status in OPEN:
        return "open"
    return "not applied yet"
