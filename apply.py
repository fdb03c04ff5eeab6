"""Applies batches of queue entries to user-portfolio-db, exactly once, parking what cannot apply.

The work itself is set-based SQL: the steps consistency.claim_batch, check_batch, compound_batch and settle_batch,
versioned in sql/migrations/ (0004_versioned_apply_steps.sql tells how), with a shorter way for clean batches
(0012_clean_batches.sql).
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import psycopg2
import psycopg2.errors
import psycopg2.extensions

import metrics
from db import one_row, pg_array
from domain import MIRRORED, OPEN, TERMINAL, Entry, Position, Queue, Stamp
from queries import query, table_query

log = logging.getLogger(__name__)


def factor_arrays(factors: Sequence[Fraction]) -> dict[str, str]:
    """Write exact tier factors as the numerator and denominator arrays the apply steps take."""
    return {
        "numerators": pg_array(f.numerator for f in factors),
        "denominators": pg_array(f.denominator for f in factors),
    }


def create_batch_table(cur: psycopg2.extensions.cursor) -> None:
    """Make sure this session has its batch table; it empties itself at every commit."""
    cur.execute(query("create_batch_table"))


def copy_batch(cur: psycopg2.extensions.cursor, queue: Queue, after: Position, limit: int) -> bytes:
    """Read the next entries of a queue-db queue after a position, as COPY text for the batch table."""
    params = {"after_ts": after[0], "after_id": after[1], "limit": limit}
    buffer = io.BytesIO()
    cur.copy_expert(cur.mogrify(table_query("queue_copy_batch", queue.table), params).decode(), buffer)
    return buffer.getvalue()


def load_copied(cur: psycopg2.extensions.cursor, data: bytes) -> tuple[int, Position | None]:
    """Load COPY text into the batch table; return how many entries it holds and the last one's position."""
    create_batch_table(cur)
    cur.execute(query("savepoint_load"))
    try:
        cur.copy_expert(query("copy_into_batch"), io.BytesIO(data))
    except psycopg2.errors.InvalidTextRepresentation:  # a uuid that is not a UUID: the claim reads each one
        cur.execute(query("rollback_to_load"))
        cur.copy_expert(query("copy_into_batch_as_written"), io.BytesIO(without_transaction_ids(data)))
    cur.execute(query("release_load"))
    cur.execute(query("batch_extent"))
    row = cur.fetchone()
    return (row[0], (row[1], row[2])) if row else (0, None)


def without_transaction_ids(data: bytes) -> bytes:
    """COPY text from queue_copy_batch less its fourth column, the transaction ids (a tab is escaped in a value)."""
    rows = (line.split(b"\t") for line in data.splitlines())
    return b"".join(b"\t".join(fields[:3] + fields[4:]) + b"\n" for fields in rows)


def load_entries(
    cur: psycopg2.extensions.cursor, entries: Sequence[Entry], reasons: Sequence[str | None] | None = None
) -> None:
    """Load entries read in Python, alone, into the batch table, with the reasons of those to park."""
    create_batch_table(cur)
    cur.execute(query("clear_batch_table"))  # what an earlier load of this transaction left
    cur.execute(
        query("load_batch_entries"),
        {
            "queue_ids": pg_array(e.queue_id for e in entries),
            "accounts": pg_array(e.account_number for e in entries),
            "uuids": pg_array(e.uuid for e in entries),
            "statuses": pg_array(e.status for e in entries),
            "updated": pg_array(e.updated_at for e in entries),
            "reasons": pg_array(reasons or [None] * len(entries)),
        },
    )


def step_params(queue: Queue, factors: Sequence[Fraction], stamp: Stamp, retrying: bool) -> dict[str, object]:
    """The parameters of the four apply steps (claim_batch, check_batch, compound_batch, settle_batch)."""
    return {
        "queue": queue.name,
        "transaction_type": queue.transaction_type,
        "columns": queue.portfolio_columns,
        "retrying": retrying,
        "terminal": pg_array(TERMINAL),
        "open": pg_array(OPEN),
        "mirrored": pg_array(MIRRORED[status] for status in TERMINAL),
        "cycle": stamp.cycle,
        "tier_version": stamp.tier_version,
        **factor_arrays(factors),
    }


# The four steps, the clean way and the careful way (sql/migrations/0012_clean_batches.sql).
CLEAN_STEPS = ("claim_batch", "check_clean_batch", "compound_batch", "settle_clean_batch")
CAREFUL_STEPS = ("claim_batch", "check_batch", "compound_batch", "settle_batch")
# The SQLSTATE with which a clean step refuses a batch that is not clean.
NOT_CLEAN = "CMB01"


def apply_batch_table(
    cur: psycopg2.extensions.cursor,
    queue: Queue,
    factors: Sequence[Fraction],
    stamp: Stamp,
    retrying: bool = False,
    queue_ids: str | None = None,
) -> Counter[str]:
    """Apply the batch table's terminal entries once each, in the caller's transaction, and count outcomes.

    A new batch is tried the clean way first; one that is not clean, and a retry of parked entries, is applied
    the careful way. Entries parked before are left to the parked retry (retrying=True), which reads their rows
    afresh. queue_ids (an array literal) names the loaded entries when the transaction loads more than one batch.
    """
    params = step_params(queue, factors, stamp, retrying)
    outcome = None if retrying else _try_clean(cur, params)
    metrics.observe_way(clean=outcome is not None)
    counts = run_steps(cur, params, CAREFUL_STEPS) if outcome is None else outcome
    if counts["corrected"]:
        _warn_corrections(cur, queue, queue_ids)
    if counts["reused"]:
        _warn_reuses(cur, queue, queue_ids)
    return +counts  # no zero counts


def run_steps(cur: psycopg2.extensions.cursor, params: dict[str, object], steps: Sequence[str]) -> Counter[str]:
    """Run the four named apply steps in order; return the outcomes, and the corrections and reuses the claim noted."""
    claim, check, compound, settle = steps
    cur.execute(query(claim), params)
    corrected, reused = one_row(cur)
    cur.execute(query(check), params)
    cur.execute(query(compound), params)
    cur.execute(query(settle), params)
    counts: Counter[str] = Counter(dict(cur.fetchall()))
    counts.update(corrected=corrected, reused=reused)
    return counts


def _try_clean(cur: psycopg2.extensions.cursor, params: dict[str, object]) -> Counter[str] | None:
    """Apply the batch the clean way; if it is not clean, undo the try and return None."""
    cur.execute(query("savepoint_clean"))
    try:
        outcome = run_steps(cur, params, CLEAN_STEPS)
    except psycopg2.Error as err:
        if err.pgcode != NOT_CLEAN:
            raise
        cur.execute(query("rollback_to_clean"))
        log.debug("a %s batch is not clean (%s); applying it the careful way", params["queue"], err.pgerror)
        return None
    cur.execute(query("release_clean"))
    return outcome


def _warn_corrections(cur: psycopg2.extensions.cursor, queue: Queue, queue_ids: str | None) -> None:
    """Name each applied entry of the batch whose queue status this transaction found changed."""
    cur.execute(query("select_new_corrections"), {"queue": queue.name, "queue_ids": queue_ids})
    for queue_id, uuid, applied, now in cur.fetchall():
        log.warning(
            "%s entry %s (portfolio transaction %s) was applied as %s and is now %s in the queue: the applied "
            "outcome stays, and GET /api/v1/consistency/corrections lists it",
            queue.name,
            queue_id,
            uuid,
            applied,
            now,
            extra={"queue": queue.name, "queue_id": queue_id, "applied_status": applied, "queue_status": now},
        )


def _warn_reuses(cur: psycopg2.extensions.cursor, queue: Queue, queue_ids: str | None) -> None:
    """Name each queue row of the batch found carrying another transaction than the one applied under its queue_id."""
    cur.execute(query("select_new_reuses"), {"queue": queue.name, "queue_ids": queue_ids})
    for queue_id, earlier, now, status in cur.fetchall():
        log.warning(
            "%s entry %s was applied as portfolio transaction %s and the queue row now carries %s (%s): a new "
            "entry, applied once unless its transaction was settled before; was queue-db restored from a backup? "
            "GET /api/v1/consistency/reused-entries lists every such row",
            queue.name,
            queue_id,
            earlier,
            now,
            status,
            extra={"queue": queue.name, "queue_id": queue_id, "earlier_transaction": str(earlier), "transaction": now},
        )


def apply_each_entry(
    cur: psycopg2.extensions.cursor,
    queue: Queue,
    entries: Sequence[Entry],
    factors: Sequence[Fraction],
    stamp: Stamp,
    retrying: bool = False,
) -> Counter[str]:
    """Apply entries one at a time, each through the batch table, parking any the database itself rejects."""
    counts: Counter[str] = Counter()
    for entry in entries:
        cur.execute(query("savepoint_entry"))
        try:
            load_entries(cur, [entry])
            counts += apply_batch_table(cur, queue, factors, stamp, retrying, pg_array([entry.queue_id]))
        except (psycopg2.IntegrityError, psycopg2.DataError) as err:
            cur.execute(query("rollback_to_entry"))
            detail = err.diag.message_primary or type(err).__name__
            park(cur, queue, [(entry, f"rejected by the database: {detail}")], stamp)
            counts["parked"] += 1
        cur.execute(query("release_entry"))
    return counts


def park(cur: psycopg2.extensions.cursor, queue: Queue, parked: list[tuple[Entry, str]], stamp: Stamp) -> None:
    """Keep entries that cannot be applied yet, with their reasons."""
    load_entries(cur, [entry for entry, _ in parked], [reason for _, reason in parked])
    cur.execute(query("park_batch"), {"queue": queue.name, "cycle": stamp.cycle})
