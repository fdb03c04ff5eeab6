"""The reference approaches the service is measured against, on the same data."""

from __future__ import annotations

import io
import time
from decimal import Decimal
from fractions import Fraction

import psycopg2
from psycopg2.extensions import connection

from domain import MIRRORED, QUEUES

BOUND_BATCH = 50_000  # entries per statement of the set-based and the lean bound
RECORD = "CREATE TABLE IF NOT EXISTS bench_applied (queue text, queue_id int, PRIMARY KEY (queue, queue_id))"


def scale(amount: Decimal, factor: Fraction) -> Decimal:
    """Multiply an amount by an exact factor, rounded half away from zero to cents, in Python."""
    numerator = int(amount.scaleb(2)) * factor.numerator
    cents, remainder = divmod(abs(numerator), factor.denominator)
    if 2 * remainder >= factor.denominator:
        cents += 1
    return Decimal(-cents if numerator < 0 else cents).scaleb(-2)


def factors(tiers: dict[str, str], kind: str) -> list[Fraction]:
    """The exact factor a completed entry applies per tier: 1 + del for values, 1 - del for allocations."""
    result = []
    for n in (1, 2, 3):
        pool, market = Fraction(Decimal(tiers[f"TIER{n}"])), Fraction(Decimal(tiers[f"TIER{n}_MV"]))
        result.append(market / pool if kind == "value" else (2 * pool - market) / pool)
    return result


def connect(uri: str) -> connection:
    """Open a connection as the service opens its own: without JIT, so that the ratios compare like with like."""
    return psycopg2.connect(uri, options="-c jit=off")


def per_entry(queue_uri: str, portfolio_uri: str, tiers: dict[str, str]) -> float:
    """A few statements and a commit per entry, on persistent connections; return the seconds taken."""
    queue_db, portfolio_db = connect(queue_uri), connect(portfolio_uri)
    queue_db.autocommit = True
    with portfolio_db, portfolio_db.cursor() as cur:
        cur.execute(RECORD)
    started = time.perf_counter()
    for queue in QUEUES:
        name, table, kind = queue.name, queue.table, queue.portfolio_columns.removesuffix("s")
        fs = factors(tiers, kind)
        with queue_db.cursor() as qcur:
            qcur.execute(f"SELECT queue_id, account_number, uuid, status FROM {table} ORDER BY updated_at, queue_id")  # noqa: S608
            entries = qcur.fetchall()
        for queue_id, account, entry, status in entries:
            with portfolio_db, portfolio_db.cursor() as cur:
                cur.execute("INSERT INTO bench_applied VALUES (%s, %s) ON CONFLICT DO NOTHING", (name, queue_id))
                if cur.rowcount == 0:
                    continue
                cur.execute("UPDATE portfolio_transactions SET status = %s WHERE id = %s", (MIRRORED[status], entry))
                if status != "COMPLETED":
                    continue
                columns = ", ".join(f"tier{n}_{kind}" for n in (1, 2, 3))
                cur.execute(f"SELECT {columns} FROM user_portfolios WHERE accountid = %s FOR UPDATE", (account,))  # noqa: S608
                new = [scale(amount, f) for amount, f in zip(cur.fetchone(), fs, strict=True)]
                cur.execute(
                    f"UPDATE user_portfolios SET tier1_{kind} = %s, tier2_{kind} = %s, tier3_{kind} = %s,"  # noqa: S608
                    f" total_{kind} = %s WHERE accountid = %s",
                    (*new, sum(new), account),
                )
    seconds = time.perf_counter() - started
    queue_db.close()
    portfolio_db.close()
    return seconds


# Applies one account's k completed entries one at a time, each rounded half away from zero, exactly.
COMPOUND = """
CREATE FUNCTION pg_temp.compound(v numeric, num numeric, den numeric, k bigint) RETURNS numeric AS $$
DECLARE
    n numeric;
    q numeric;
BEGIN
    FOR i IN 1..k LOOP
        n := v * 100 * num;
        q := div(abs(n), den);
        IF 2 * (abs(n) - q * den) >= den THEN
            q := q + 1;
        END IF;
        v := sign(n) * q / 100;
    END LOOP;
    RETURN round(v, 2);
END $$ LANGUAGE plpgsql IMMUTABLE
"""

# The essential checks, as the service's: an entry whose account has no portfolio, or whose transaction is missing or
# another account's, is neither recorded nor applied (the service parks it). The transaction's account is looked up
# per entry, by its primary key, as a scalar subquery: a join on both columns would be estimated at one row, and the
# plans after it would loop over the whole batch for each entry.
BATCH_STATEMENT = """
WITH claimed AS (
    INSERT INTO bench_applied SELECT %(queue)s, b.queue_id FROM {batch} b
     WHERE b.account IS NOT DISTINCT FROM (SELECT t.accountid FROM portfolio_transactions t WHERE t.id = b.uuid)
       AND EXISTS (SELECT 1 FROM user_portfolios p WHERE p.accountid = b.account)
        ON CONFLICT DO NOTHING RETURNING queue_id
), mine AS (
    SELECT b.* FROM {batch} b WHERE b.queue_id IN (SELECT queue_id FROM claimed)
), mirrored AS (  -- a data-modifying CTE always runs to completion
    UPDATE portfolio_transactions t
       SET status = CASE mine.status WHEN 'COMPLETED' THEN 'PROCESSED' ELSE mine.status END
      FROM mine WHERE t.id = mine.uuid AND t.id = ANY (ARRAY(SELECT uuid FROM mine))
    RETURNING 1
), completed AS (
    SELECT account, count(*) AS k FROM mine WHERE status = 'COMPLETED' GROUP BY account
), scaled AS (
    SELECT p.accountid,
           pg_temp.compound(p.tier1_{kind}, %(n1)s, %(d1)s, c.k) AS t1,
           pg_temp.compound(p.tier2_{kind}, %(n2)s, %(d2)s, c.k) AS t2,
           pg_temp.compound(p.tier3_{kind}, %(n3)s, %(d3)s, c.k) AS t3
      FROM user_portfolios p JOIN completed c ON c.account = p.accountid
)
UPDATE user_portfolios p
   SET tier1_{kind} = s.t1, tier2_{kind} = s.t2, tier3_{kind} = s.t3, total_{kind} = s.t1 + s.t2 + s.t3
  FROM scaled s
 WHERE p.accountid = s.accountid
"""


def set_based(queue_uri: str, portfolio_uri: str, tiers: dict[str, str], batch: int = BOUND_BATCH) -> float:
    """COPY batches out of queue-db and into a temp table, then one statement per batch; return the seconds."""
    queue_db, portfolio_db = connect(queue_uri), connect(portfolio_uri)
    queue_db.autocommit = True
    with portfolio_db, portfolio_db.cursor() as cur:
        cur.execute(RECORD)
        cur.execute(COMPOUND)
        cur.execute("CREATE TEMP TABLE batch (queue_id int, account text, uuid uuid, status text)")
    started = time.perf_counter()
    for queue in QUEUES:
        name, table, kind = queue.name, queue.table, queue.portfolio_columns.removesuffix("s")
        params = {"queue": name}
        for n, f in enumerate(factors(tiers, kind), start=1):
            params[f"n{n}"], params[f"d{n}"] = f.numerator, f.denominator
        after = ("1970-01-01", 0)
        while True:
            buffer = io.StringIO()
            with queue_db.cursor() as qcur:
                qcur.execute(
                    f"SELECT updated_at, queue_id FROM {table} WHERE (updated_at, queue_id) > (%s, %s)"  # noqa: S608
                    " ORDER BY updated_at, queue_id OFFSET %s LIMIT 1",
                    (*after, batch - 1),
                )
                last = qcur.fetchone()
                bound = qcur.mogrify(
                    f"SELECT queue_id, account_number, uuid, status FROM {table}"  # noqa: S608
                    " WHERE (updated_at, queue_id) > (%s, %s) AND (%s IS NULL OR (updated_at, queue_id) <= (%s, %s))"
                    " ORDER BY updated_at, queue_id",
                    (*after, last and last[0], last and last[0], last and last[1]),
                ).decode()
                qcur.copy_expert(f"COPY ({bound}) TO STDOUT", buffer)
            buffer.seek(0)
            with portfolio_db, portfolio_db.cursor() as cur:
                cur.execute("TRUNCATE batch")
                cur.copy_expert("COPY batch FROM STDIN", buffer)
                cur.execute("ANALYZE batch")
                cur.execute(BATCH_STATEMENT.replace("{kind}", kind).replace("{batch}", "batch"), params)
            if last is None:
                break
            after = (last[0], last[1])
    seconds = time.perf_counter() - started
    queue_db.close()
    portfolio_db.close()
    return seconds


LEAN_COPY = (
    "COPY (SELECT queue_id, account_number, uuid, status, updated_at FROM {table}"
    " WHERE (updated_at, queue_id) > (%s, %s) ORDER BY updated_at, queue_id LIMIT %s) TO STDOUT"
)


def lean(
    queue_uri: str,
    portfolio_uri: str,
    tiers: dict[str, str],
    batch: int = BOUND_BATCH,
    after: dict[str, tuple[object, int]] | None = None,
) -> float:
    """The essential writes alone: per batch two COPYs and one statement, nothing else; return the seconds.

    The batch table empties itself at each commit (no TRUNCATE), has no statistics (no ANALYZE), and the next
    batch starts after the last row copied (no OFFSET probe). Each queue is read from its position in `after`, if
    given: past a history already applied.
    """
    queue_db, portfolio_db = connect(queue_uri), connect(portfolio_uri)
    queue_db.autocommit = True
    with portfolio_db, portfolio_db.cursor() as cur:
        cur.execute(RECORD)
        cur.execute(COMPOUND)
        cur.execute(
            "CREATE TEMP TABLE lean_batch (queue_id int, account text, uuid uuid, status text, updated_at timestamptz)"
            " ON COMMIT DELETE ROWS"
        )
    started = time.perf_counter()
    for queue in QUEUES:
        kind = queue.portfolio_columns.removesuffix("s")
        statement = BATCH_STATEMENT.replace("{kind}", kind).replace("{batch}", "lean_batch")
        params: dict[str, object] = {"queue": queue.name}
        for n, f in enumerate(factors(tiers, kind), start=1):
            params[f"n{n}"], params[f"d{n}"] = f.numerator, f.denominator
        position = (after or {}).get(queue.name, ("1970-01-01 00:00:00+00", 0))
        while True:
            buffer = io.BytesIO()
            with queue_db.cursor() as qcur:
                copy = qcur.mogrify(LEAN_COPY.format(table=queue.table), (*position, batch)).decode()
                qcur.copy_expert(copy, buffer)
            data = buffer.getvalue()
            if not data:
                break
            with portfolio_db, portfolio_db.cursor() as cur:
                cur.copy_expert("COPY lean_batch FROM STDIN", io.BytesIO(data))
                cur.execute(statement, params)
            last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1].split(b"\t")
            position = (last[4].decode(), int(last[0]))
            if data.count(b"\n") < batch:
                break
    seconds = time.perf_counter() - started
    queue_db.close()
    portfolio_db.close()
    return seconds
