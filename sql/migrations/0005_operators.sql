-- What operators need to prove every balance and act on what is stuck: the journal of every entry, the
-- entries dismissed by hand, the audit trail of operator actions and the pause.

-- Cycle numbers: every cycle that takes its turn draws one, and the journal names it.
CREATE SEQUENCE consistency.cycles;

-- The journal: what became of each entry, newest last. Every entry the service applies writes an
-- 'applied' row in the same transaction as its effects: its outcome (status), and for completed entries the
-- three tier amounts before and after, with the tier values in force (the newest tier_value_history row,
-- tier_version). Parkings (when they start and when their reason changes, not once per retry), their ends,
-- corrections and operator actions are written against the entry too. Kept as long as the ledger.
CREATE TABLE consistency.journal (
    id             BIGINT GENERATED ALWAYS AS IDENTITY,
    queue          TEXT NOT NULL,
    queue_id       INTEGER NOT NULL,
    account_number TEXT COLLATE "C",  -- compared byte by byte: an index in the database's collation costs twice
    kind           TEXT NOT NULL,
    status         TEXT,
    reason         TEXT,
    attempts       INTEGER,
    -- A completed entry's three tier amounts before and after it; NULL for the other records. Six plain columns
    -- rather than two arrays: a narrower row, and nothing to build per entry.
    tier1_before   NUMERIC,
    tier2_before   NUMERIC,
    tier3_before   NUMERIC,
    tier1_after    NUMERIC,
    tier2_after    NUMERIC,
    tier3_after    NUMERIC,
    tier_version   BIGINT,
    cycle          BIGINT,
    actor          TEXT,
    at             TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);
-- One index, which serves both readers: an account's records newest first, and an entry's story (within its
-- account). Each index on this table costs the apply about a tenth of its throughput, so there is no other:
-- not even a primary key, since nothing looks a record up by its id alone.
CREATE INDEX journal_account ON consistency.journal (account_number, id);

-- Entries an operator dismissed: never applied, whatever their queue rows do later.
CREATE TABLE consistency.resolved_entries (
    queue          TEXT NOT NULL,
    queue_id       INTEGER NOT NULL,
    uuid           TEXT,
    account_number TEXT,
    status         TEXT,
    reason         TEXT NOT NULL,
    resolved_by    TEXT NOT NULL,
    resolved_at    TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (queue, queue_id)
);

-- Every change an operator made through the API: who, when, what, what it touched and why.
CREATE TABLE consistency.audit_log (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target JSONB NOT NULL DEFAULT '{}',
    reason TEXT,
    detail JSONB NOT NULL DEFAULT '{}'
);

-- The pause: while this row exists, no process applies anything.
CREATE TABLE consistency.pause (
    id        BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    paused_by TEXT NOT NULL,
    reason    TEXT NOT NULL,
    paused_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Where the service was adopted on a running system, per queue: the settled entries before this position were
-- applied by whatever ran before it. They are not applied, and a drift check does not count them as findings.
CREATE TABLE consistency.baseline (
    queue      TEXT PRIMARY KEY CHECK (queue IN ('investment', 'withdrawal')),
    updated_at TIMESTAMPTZ NOT NULL,
    queue_id   INTEGER NOT NULL,
    source     TEXT NOT NULL,  -- 'INITIAL_WATERMARK', or the baseline action
    set_by     TEXT,
    set_at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- The apply steps, version 2: they write the journal. claim_batch_v2 also leaves out resolved entries.

-- Claims the batch as claim_batch_v1 does, after leaving out the entries an operator resolved: they are never
-- applied, whatever their queue rows do later. Returns the corrections noted.
--
-- A resolve and a batch that would apply the same entry take turns on its parked row. Without that, a resolve
-- could commit between leaving resolved entries out and the claim, or while a retry's claimed batch is still
-- open (a ledger record not yet committed is invisible to the resolve), and the batch would apply an entry
-- that was resolved. So the claim first locks the parked rows of the batch's entries, in queue_id order, as a
-- resolve locks the row it resolves. A resolve that holds one commits first, and the statements after the
-- lock see its resolved entry (each statement of a function reads what committed before it began); a resolve
-- that comes later waits for the batch's transaction, and then finds its entry applied, or parked again. The
-- lock is a join of the batch with the parked entries, like the look-up of them below, and costs as much.
CREATE FUNCTION consistency.claim_batch_v2(
    p_queue TEXT, p_retrying BOOLEAN, p_terminal TEXT[], p_open TEXT[], p_cycle BIGINT
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
BEGIN
    PERFORM 1
       FROM consistency.parked_entries p
       JOIN pg_temp.cm_batch b ON b.queue_id = p.queue_id
      WHERE p.queue = p_queue
      ORDER BY p.queue_id
        FOR UPDATE OF p;
    DELETE FROM pg_temp.cm_batch b
     USING consistency.resolved_entries r
     WHERE r.queue = p_queue AND r.queue_id = b.queue_id;
    IF NOT p_retrying THEN
        DELETE FROM pg_temp.cm_batch b
         USING consistency.parked_entries p
         WHERE p.queue = p_queue AND p.queue_id = b.queue_id;
    END IF;
    BEGIN
        UPDATE pg_temp.cm_batch SET txn_id = uuid::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        UPDATE pg_temp.cm_batch SET txn_id = consistency.to_uuid(uuid);
    END;
    left_over := consistency.record_batch_v1(p_queue, p_terminal);
    ANALYZE pg_temp.cm_batch (queue_id, account_number, status, txn_id, reason, unclaimed);
    IF left_over = 0 THEN
        RETURN 0;
    END IF;
    RETURN consistency.sort_unclaimed_v2(p_queue, p_terminal, p_open, p_cycle);
END
$$;

-- Sorts the entries the claim left as sort_unclaimed_v1 does, with a journal record for each correction that
-- starts or changes and each that ends. Returns the corrections noted.
CREATE FUNCTION consistency.sort_unclaimed_v2(p_queue TEXT, p_terminal TEXT[], p_open TEXT[], p_cycle BIGINT)
RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    corrected BIGINT;
BEGIN
    WITH seen AS (
        DELETE FROM pg_temp.cm_batch b
         USING consistency.applied_entries a
         WHERE b.unclaimed AND a.queue = p_queue AND a.queue_id = b.queue_id
        RETURNING b.queue_id, b.uuid, b.account_number, b.status AS queue_status, a.status AS applied_status
    ), ended AS (
        DELETE FROM consistency.corrections k
         USING seen s
         WHERE k.queue = p_queue AND k.queue_id = s.queue_id AND s.queue_status = s.applied_status
        RETURNING k.queue_id
    ), changed AS (
        INSERT INTO consistency.corrections AS k (queue, queue_id, uuid, applied_status, queue_status)
        SELECT p_queue, queue_id, uuid, applied_status, queue_status
          FROM seen
         WHERE queue_status IS DISTINCT FROM applied_status
            ON CONFLICT (queue, queue_id) DO UPDATE
           SET queue_status = EXCLUDED.queue_status, uuid = EXCLUDED.uuid, noticed_at = CURRENT_TIMESTAMP
         WHERE k.queue_status IS DISTINCT FROM EXCLUDED.queue_status
        RETURNING k.queue_id
    ), noted AS (
        INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, reason, cycle)
        SELECT p_queue, s.queue_id, s.account_number, c.kind, s.queue_status,
               format('applied as %s, now %s in the queue', s.applied_status, coalesce(s.queue_status, 'NULL')), p_cycle
          FROM (SELECT queue_id, 'corrected' AS kind FROM changed
                UNION ALL
                SELECT queue_id, 'agrees_again' FROM ended) AS c
          JOIN seen s ON s.queue_id = c.queue_id
         ORDER BY s.queue_id
        RETURNING kind
    )
    SELECT count(*) FILTER (WHERE kind = 'corrected') INTO corrected FROM noted;
    UPDATE pg_temp.cm_batch b
       SET reason = CASE WHEN b.status = ANY (p_terminal)
                         THEN 'portfolio transaction already settled by '
                              || coalesce((SELECT a.queue || ' entry ' || a.queue_id
                                             FROM consistency.applied_entries a
                                            WHERE a.txn_id = b.txn_id), 'another entry')
                         ELSE 'unknown status ' || coalesce(quote_literal(b.status), 'NULL')
                    END
     WHERE b.unclaimed AND NOT coalesce(b.status = ANY (p_open), FALSE);
    DELETE FROM pg_temp.cm_batch WHERE unclaimed AND reason IS NULL;
    RETURN corrected;
END
$$;

-- Applies k completed entries to one portfolio's three tier amounts as consistency.compound does, and also
-- returns the amounts after each step that was stored, one array per tier (after1[i] is tier 1 after step i):
-- the journal's record of each entry.
CREATE FUNCTION consistency.compound_trail(
    amounts NUMERIC[], numerators NUMERIC[], denominators NUMERIC[], k INTEGER,
    OUT result NUMERIC[], OUT applied INTEGER, OUT problem TEXT,
    OUT after1 NUMERIC[], OUT after2 NUMERIC[], OUT after3 NUMERIC[]
)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    t1 NUMERIC := amounts[1];
    t2 NUMERIC := amounts[2];
    t3 NUMERIC := amounts[3];
    n1 NUMERIC := numerators[1] * 100;
    n2 NUMERIC := numerators[2] * 100;
    n3 NUMERIC := numerators[3] * 100;
    d1 NUMERIC := denominators[1];
    d2 NUMERIC := denominators[2];
    d3 NUMERIC := denominators[3];
    s1 NUMERIC;
    s2 NUMERIC;
    s3 NUMERIC;
    -- Local arrays: plpgsql appends to them in place.
    y1 NUMERIC[] := '{}';
    y2 NUMERIC[] := '{}';
    y3 NUMERIC[] := '{}';
BEGIN
    applied := 0;
    WHILE applied < k LOOP
        -- Whole cents times an integer is exact; adding half the denominator before the integer
        -- division rounds half away from zero.
        s1 := t1 * n1;
        s2 := t2 * n2;
        s3 := t3 * n3;
        s1 := sign(s1) * div(2 * abs(s1) + d1, 2 * d1) / 100;
        s2 := sign(s2) * div(2 * abs(s2) + d2, 2 * d2) / 100;
        s3 := sign(s3) * div(2 * abs(s3) + d3, 2 * d3) / 100;
        IF s1 < 0 OR s2 < 0 OR s3 < 0 THEN
            problem := 'result would be negative';
            EXIT;
        END IF;
        IF s1 + s2 + s3 >= 1e13 THEN
            problem := 'result would overflow NUMERIC(15,2)';
            EXIT;
        END IF;
        t1 := round(s1, 2);
        t2 := round(s2, 2);
        t3 := round(s3, 2);
        y1 := y1 || t1;
        y2 := y2 || t2;
        y3 := y3 || t3;
        applied := applied + 1;
    END LOOP;
    result := ARRAY[t1, t2, t3];
    after1 := y1;
    after2 := y2;
    after3 := y3;
END
$$;

-- Compounds the batch's completed entries as compound_batch_v1 does, and writes each applied one's journal
-- record: the amounts before and after it (before its first step, the portfolio's; then the step before's
-- after), the tier values in force, the attempts of a parking it ends, the cycle. Accounts are grouped byte
-- by byte (COLLATE "C"): the database's collation would only cost time.
CREATE FUNCTION consistency.compound_batch_v2(
    p_queue TEXT, p_retrying BOOLEAN, p_columns TEXT, p_numerators NUMERIC[], p_denominators NUMERIC[],
    p_tier_version BIGINT, p_cycle BIGINT
) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    WITH eligible AS (
        SELECT account_number COLLATE "C" AS account, array_agg(queue_id ORDER BY updated_at, queue_id) AS ids
          FROM pg_temp.cm_batch
         WHERE reason IS NULL AND status = 'COMPLETED'
         GROUP BY 1
    ), computed AS (
        SELECT p.accountid, e.ids, s.amounts, c.result, c.applied, c.problem, c.after1, c.after2, c.after3
          FROM eligible e
          JOIN user_portfolios p ON p.accountid = e.account COLLATE "default"
         CROSS JOIN LATERAL (SELECT CASE p_columns
                                        WHEN 'values' THEN ARRAY[p.tier1_value, p.tier2_value, p.tier3_value]
                                        ELSE ARRAY[p.tier1_allocation, p.tier2_allocation, p.tier3_allocation]
                                    END AS amounts) AS s
         CROSS JOIN LATERAL consistency.compound_trail(s.amounts, p_numerators, p_denominators, cardinality(e.ids)) AS c
    ), blocked AS (
        -- Only the portfolios where a step could not be stored: usually none.
        UPDATE pg_temp.cm_batch b
           SET reason = c.problem
          FROM computed c, unnest(c.ids[c.applied + 1:]) AS u(queue_id)
         WHERE c.problem IS NOT NULL AND b.queue_id = u.queue_id
    ), journaled AS (
        -- Each portfolio's records in the order its entries applied: the unnest gives them in that order, and
        -- nothing between it and the insert reorders rows. Only a retry looks up the attempts of the parkings
        -- it ends: a drain's batch holds no parked entry.
        INSERT INTO consistency.journal
               (queue, queue_id, account_number, kind, status, attempts, tier1_before, tier2_before, tier3_before,
                tier1_after, tier2_after, tier3_after, tier_version, cycle)
        SELECT p_queue, u.queue_id, c.accountid, 'applied', 'COMPLETED',
               CASE WHEN p_retrying THEN (SELECT p.attempts FROM consistency.parked_entries p
                                           WHERE p.queue = p_queue AND p.queue_id = u.queue_id) END,
               u.before1, u.before2, u.before3, u.after1, u.after2, u.after3, p_tier_version, p_cycle
          FROM computed c
         CROSS JOIN LATERAL unnest(c.ids[1:c.applied],
                                   c.amounts[1] || c.after1, c.amounts[2] || c.after2, c.amounts[3] || c.after3,
                                   c.after1, c.after2, c.after3)
               WITH ORDINALITY AS u(queue_id, before1, before2, before3, after1, after2, after3, n)
         WHERE u.n <= c.applied
    )
    UPDATE user_portfolios p
       SET tier1_value = CASE p_columns WHEN 'values' THEN c.result[1] ELSE p.tier1_value END,
           tier2_value = CASE p_columns WHEN 'values' THEN c.result[2] ELSE p.tier2_value END,
           tier3_value = CASE p_columns WHEN 'values' THEN c.result[3] ELSE p.tier3_value END,
           total_value = CASE p_columns WHEN 'values' THEN c.result[1] + c.result[2] + c.result[3]
                                        ELSE p.total_value END,
           tier1_allocation = CASE p_columns WHEN 'allocations' THEN c.result[1] ELSE p.tier1_allocation END,
           tier2_allocation = CASE p_columns WHEN 'allocations' THEN c.result[2] ELSE p.tier2_allocation END,
           tier3_allocation = CASE p_columns WHEN 'allocations' THEN c.result[3] ELSE p.tier3_allocation END,
           total_allocation = CASE p_columns WHEN 'allocations' THEN c.result[1] + c.result[2] + c.result[3]
                                             ELSE p.total_allocation END,
           updated_at = CURRENT_TIMESTAMP
      FROM computed c
     WHERE p.accountid = c.accountid
       AND c.applied > 0;
END
$$;

-- Parks the batch's entries that have a reason as park_batch does, with a journal record when a parking starts
-- or its reason changes: a retry that finds the same reason counts an attempt and adds no record.
CREATE FUNCTION consistency.park_batch_v2(p_queue TEXT, p_cycle BIGINT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    WITH old AS (
        SELECT p.queue_id, p.reason
          FROM consistency.parked_entries p
         WHERE p.queue = p_queue
           AND p.queue_id = ANY (ARRAY(SELECT queue_id FROM pg_temp.cm_batch WHERE reason IS NOT NULL))
    ), parked AS (
        INSERT INTO consistency.parked_entries AS p
               (queue, queue_id, uuid, account_number, status, updated_at, reason)
        SELECT p_queue, queue_id, uuid, account_number, status, updated_at, reason
          FROM pg_temp.cm_batch
         WHERE reason IS NOT NULL
            ON CONFLICT (queue, queue_id) DO UPDATE
           SET uuid = EXCLUDED.uuid,
               account_number = EXCLUDED.account_number,
               status = EXCLUDED.status,
               updated_at = EXCLUDED.updated_at,
               reason = EXCLUDED.reason,
               attempts = p.attempts + 1,
               last_attempt_at = CURRENT_TIMESTAMP
        RETURNING p.queue_id, p.account_number, p.status, p.reason, p.attempts
    )
    INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, reason, attempts, cycle)
    SELECT p_queue, n.queue_id, n.account_number, 'parked', n.status, n.reason, n.attempts, p_cycle
      FROM parked n
      LEFT JOIN old o ON o.queue_id = n.queue_id
     WHERE o.reason IS DISTINCT FROM n.reason
     ORDER BY n.queue_id;
END
$$;

-- Settles the batch as settle_batch_v1 does, and writes the journal records of the applied entries that did
-- not complete (compound_batch_v2 wrote the others'): their outcome, the attempts of a parking they end, the
-- cycle. Returns how many entries had each outcome: their status, or 'parked'.
CREATE FUNCTION consistency.settle_batch_v2(p_queue TEXT, p_terminal TEXT[], p_mirrored TEXT[], p_cycle BIGINT)
RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM consistency.applied_entries
     WHERE queue = p_queue
       AND queue_id = ANY (ARRAY(SELECT queue_id FROM pg_temp.cm_batch WHERE reason IS NOT NULL AND NOT unclaimed));
    IF EXISTS (SELECT 1 FROM pg_temp.cm_batch WHERE reason IS NOT NULL) THEN
        PERFORM consistency.park_batch_v2(p_queue, p_cycle);
    END IF;

    WITH ended AS (
        DELETE FROM consistency.parked_entries p
         USING pg_temp.cm_batch b
         WHERE b.reason IS NULL
           AND p.queue = p_queue AND p.queue_id = b.queue_id
        RETURNING p.queue_id, p.attempts
    )
    INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, attempts, cycle)
    SELECT p_queue, b.queue_id, b.account_number, 'applied', b.status, e.attempts, p_cycle
      FROM pg_temp.cm_batch b
      LEFT JOIN ended e ON e.queue_id = b.queue_id
     WHERE b.reason IS NULL AND b.status <> 'COMPLETED'
     ORDER BY b.updated_at, b.queue_id;

    UPDATE portfolio_transactions t
       SET status = p_mirrored[array_position(p_terminal, b.status)],
           updated_at = CURRENT_TIMESTAMP
      FROM pg_temp.cm_batch b
     WHERE b.reason IS NULL
       AND t.id = b.txn_id
       AND t.id = ANY (ARRAY(SELECT txn_id FROM pg_temp.cm_batch WHERE reason IS NULL));

    RETURN QUERY
        SELECT CASE WHEN b.reason IS NULL THEN b.status ELSE 'parked' END, count(*)
          FROM pg_temp.cm_batch b
         GROUP BY 1;
END
$$;
