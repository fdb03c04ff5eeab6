"""What a drift check compares, one chunk at a time: queue entries with the ledger, the ledger with the queue and
the portfolio transactions, and the portfolio transactions with the ledger.

queue-db and user-portfolio-db are two databases: a chunk of keys is read from one, in key order, and the same
keys are looked up by index in the other, here in Python. Every read is its own short transaction; nothing is
written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions

from db import Database, in_transaction, pg_array
from domain import (
    CHANGED_ENTRY,
    CHANGED_TRANSACTION,
    MIRRORED,
    OPEN,
    PROCESSED,
    QUEUES,
    REUSED_ENTRY,
    UNAPPLIED_ENTRY,
    UNRECORDED_TRANSACTION,
    Entry,
    Queue,
)
from queries import query, table_query

Connection = psycopg2.extensions.connection
# Where a walk goes on: a queue_id, or a portfolio transaction's id.
Key = int | str
FIRST_QUEUE_ID = -(2**31)  # the smallest INTEGER: every queue_id is at least this
FIRST_TRANSACTION_ID = "00000000-0000-0000-0000-000000000000"  # the smallest UUID


@dataclass(frozen=True)
class Finding:
    """One disagreement a check found, with the entry or the transaction named."""

    kind: str
    queue: str | None
    queue_id: int | None
    uuid: str | None
    txn_id: str | None
    account: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class Chunk:
    """What one chunk of a walk read and found, and the first key of the next chunk (None: the walk is done)."""

    rows: int
    findings: tuple[Finding, ...]
    following: Key | None


@dataclass(frozen=True)
class Phase:
    """One walk of a check: a queue's entries, a queue's ledger records, or the portfolio transactions."""

    name: str
    walk: str  # "entries", "ledger" or "transactions"
    queue: Queue | None = None

    @property
    def first(self) -> Key:
        """Return the key the walk starts at."""
        return FIRST_TRANSACTION_ID if self.queue is None else FIRST_QUEUE_ID


PHASES = (
    *(Phase(f"{queue.name}_entries", "entries", queue) for queue in QUEUES),
    *(Phase(f"{queue.name}_ledger", "ledger", queue) for queue in QUEUES),
    Phase("transactions", "transactions"),
)


def read_chunk(phase: Phase, queue_db: Database, pconn: Connection, start: Key, limit: int) -> Chunk:
    """Read the chunk of a phase that starts at `start`, at most `limit` rows, and compare it."""
    if phase.queue is None:
        return _transactions_chunk(pconn, str(start), limit)
    if phase.walk == "entries":
        return _entries_chunk(phase.queue, queue_db, pconn, int(start), limit)
    return _ledger_chunk(phase.queue, queue_db, pconn, int(start), limit)


def _split(rows: list[tuple[Any, ...]], limit: int) -> tuple[list[tuple[Any, ...]], Key | None]:
    """Split the rows of a chunk read with one row more than `limit`, in key order: the chunk, and the next key."""
    rows.sort(key=lambda row: row[0])
    following: Key | None = rows[limit][0] if len(rows) > limit else None
    return rows[:limit], following


def _portfolio_rows(pconn: Connection, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Read one chunk with a named query in a short transaction of its own on user-portfolio-db."""
    with in_transaction(pconn) as cur:
        cur.execute(query("drift_keyset_plan"))
        cur.execute(query(name), params)
        return cur.fetchall()


def _queue_rows(queue_db: Database, name: str, queue: Queue, params: dict[str, Any]) -> list[Entry]:
    """Read queue entries with a named query in a short transaction of its own on a pooled queue-db connection."""
    with queue_db.transaction() as cur:
        cur.execute(query("drift_keyset_plan"))
        cur.execute(table_query(name, queue.table), params)
        return [Entry(*row) for row in cur.fetchall()]


def _current(queue_db: Database, queue: Queue, queue_ids: Sequence[int]) -> dict[int, Entry]:
    """Look queue rows up by queue_id, as they stand now."""
    if not queue_ids:
        return {}
    entries = _queue_rows(queue_db, "queue_select_by_id", queue, {"queue_ids": pg_array(queue_ids)})
    return {entry.queue_id: entry for entry in entries}


def _entries_chunk(queue: Queue, queue_db: Database, pconn: Connection, start: int, limit: int) -> Chunk:
    """Settled entries at or behind the watermark that were never applied, neither parked nor resolved."""
    rows = _queue_rows(queue_db, "drift_queue_chunk", queue, {"next": start, "limit": limit + 1})
    following = rows[limit].queue_id if len(rows) > limit else None
    settled = [entry for entry in rows[:limit] if entry.status not in OPEN]
    suspects = _unapplied(pconn, queue, settled)
    # A row that changed since it was read (released, reopened) may have been right to have no record: read
    # the suspects again, and keep those that stand as they were.
    current = _current(queue_db, queue, [entry.queue_id for entry in suspects])
    confirmed = [entry for entry in suspects if current.get(entry.queue_id) == entry]
    findings = tuple(_unapplied_finding(queue, entry) for entry in confirmed)
    return Chunk(min(len(rows), limit), findings, following)


def _unapplied(pconn: Connection, queue: Queue, settled: list[Entry]) -> list[Entry]:
    """Of settled entries, those behind the watermark, not before the baseline, with no record, parked or resolved."""
    if not settled:
        return []
    params = {
        "queue": queue.name,
        "queue_ids": pg_array(entry.queue_id for entry in settled),
        "updated": pg_array(entry.updated_at for entry in settled),
        "uuids": pg_array(entry.uuid for entry in settled),
    }
    found = {row[0] for row in _portfolio_rows(pconn, "drift_unapplied", params)}
    return [entry for entry in settled if entry.queue_id in found]


def _unapplied_finding(queue: Queue, entry: Entry) -> Finding:
    """Describe a settled entry the ledger has no record of."""
    detail = {"status": entry.status, "updated_at": entry.updated_at.isoformat()}
    return Finding(
        UNAPPLIED_ENTRY, queue.name, entry.queue_id, entry.uuid, entry.transaction, entry.account_number, detail
    )


def _ledger_chunk(queue: Queue, queue_db: Database, pconn: Connection, start: int, limit: int) -> Chunk:
    """Ledger records whose queue row is gone, changed status or carries another transaction, and whose
    transaction's status differs."""
    params = {"queue": queue.name, "next": start, "limit": limit + 1}
    rows, following = _split(_portfolio_rows(pconn, "drift_ledger_chunk", params), limit)
    if following is not None and any(row[0] == following for row in rows):
        # The records of one queue_id (one per transaction applied under it) go in one chunk: the next starts at it.
        rows = [row for row in rows if row[0] != following] or rows
        following = following if rows[-1][0] != following else int(following) + 1
    current = _current(queue_db, queue, [row[0] for row in rows])
    findings = tuple(found for row in rows for found in _ledger_findings(queue, row, current.get(row[0])))
    return Chunk(len(rows), findings, following)


def _ledger_findings(queue: Queue, row: tuple[Any, ...], entry: Entry | None) -> list[Finding]:
    """Compare one ledger record with its queue row as it stands now and with its portfolio transaction."""
    queue_id, uuid, txn_id, applied, txn_status, txn_account, before_baseline = row
    account = entry.account_number if entry is not None else txn_account
    found = []
    if entry is not None and txn_id is not None and entry.transaction != str(txn_id):
        detail = {"applied_status": applied, "queue_uuid": entry.uuid, "queue_status": entry.status}
        found.append(Finding(REUSED_ENTRY, queue.name, queue_id, uuid, txn_id, account, detail))
    elif entry is None or entry.status != applied:
        detail = {"applied_status": applied, "queue_status": None if entry is None else entry.status}
        detail["queue_row"] = "gone" if entry is None else "changed"
        found.append(Finding(CHANGED_ENTRY, queue.name, queue_id, uuid, txn_id, account, detail))
    mirrored = MIRRORED.get(applied)
    if txn_id is not None and txn_status != mirrored and not before_baseline:
        # A transaction status of null: the transaction is gone.
        detail = {"applied_status": applied, "mirrored_status": mirrored, "transaction_status": txn_status}
        found.append(Finding(CHANGED_TRANSACTION, queue.name, queue_id, uuid, txn_id, account, detail))
    return found


def _transactions_chunk(pconn: Connection, start: str, limit: int) -> Chunk:
    """PROCESSED portfolio transactions that no ledger record settled, leaving out those settled before the baseline."""
    params = {
        "next": start,
        "limit": limit + 1,
        "types": pg_array(queue.transaction_type for queue in QUEUES),
        "queues": pg_array(queue.name for queue in QUEUES),
    }
    rows, following = _split(_portfolio_rows(pconn, "drift_transaction_chunk", params), limit)
    findings = tuple(
        Finding(
            UNRECORDED_TRANSACTION, queue, None, txn_id, txn_id, account, {"transaction_type": kind, "status": status}
        )
        for txn_id, account, kind, status, queue, recorded, before_baseline in rows
        if status == PROCESSED and not recorded and not before_baseline
    )
    return Chunk(len(rows), findings, following)
