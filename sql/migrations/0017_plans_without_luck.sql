-- Plans that do not depend on luck: each apply step reads the batch once, and each table of user-portfolio-db by
-- its keys, whichever way the batch takes (clean or careful), on an empty ledger or a long one, whether or not
-- anything has been analysed, as a custom plan or as the generic plan PL/pgSQL may keep (tests/test_plans.py).
-- - claim_batch_v6 gathers the batch table's statistics whenever there are none, not only when the batch's size
--   changed. A refused clean try rolls back the statistics its claim gathered but not the row count, which ANALYZE
--   writes in place; the careful claim after it found the size unchanged, so every careful step was planned
--   without statistics: nested loops over the batch, 3.3 s in settle alone for a batch of 5,000.
-- - record_batch_v4 probes the ledger's (queue, queue_id) index once per entry. An unanalysed ledger could turn
--   the lookup of the batch's ids into a scan of the queue's records that searched the ids for each record.
-- - check_batch_v4 and check_clean_batch_v2 take portfolios and transactions through their primary key's index
--   (SET enable_seqscan = off: a scan of a table the planner takes for small searched the batch's keys for each of
--   its rows), and keep where each portfolio lies.
-- - compound_batch_v4 reads and updates the portfolios where the check took them, and settle_batch_v4 joins the
--   transactions it reads where the check took them to the batch by their id. They, and check_batch_v4, join the
--   batch's sets by hashing them (SET enable_nestloop = off): a nested loop read one set again for each row of
--   another, or sorted the batch's keys again for each row, whenever the planner expected a handful of rows.
-- Costs that disabled plans carry would call for JIT compilation, so each of these functions also sets jit off,
-- as the service's own connections do. Each step gives what the step before it gave; the service calls these in
-- place of claim_batch_v5, record_batch_v3, check_batch_v3, check_clean_batch_v1, compound_batch_v3 and
-- settle_batch_v3, which stay for pods of the previous release (whose sessions' cm_taken_portfolios has no row_id:
-- their steps never read it).

-- Records the batch's terminal entries as record_batch_v3 does, probing the ledger's (queue, queue_id) index once
-- per entry: a read of the ledger that an unanalysed ledger cannot turn into a scan of the queue's records that
-- searches the batch's ids for each.
CREATE FUNCTION consistency.record_batch_v4(
    p_queue TEXT, p_terminal TEXT[], p_open TEXT[], p_cycle BIGINT, OUT left_over BIGINT, OUT reused BIGINT
)
LANGUAGE plpgsql AS $$
DECLARE
    known_ids INTEGER[];
    known_txns UUID[];
    known_at TIMESTAMPTZ[];
    marked BIGINT;
BEGIN
    left_over := 0;
    reused := 0;
    -- OFFSET 0 keeps the probe a probe: the planner may not turn it into a join that reads the ledger.
    SELECT array_agg(a.queue_id), array_agg(a.txn_id), array_agg(a.applied_at)
      INTO known_ids, known_txns, known_at
      FROM pg_temp.cm_batch b
     CROSS JOIN LATERAL (SELECT l.queue_id, l.txn_id, l.applied_at
                           FROM consistency.applied_entries l
                          WHERE l.queue = p_queue AND l.queue_id = b.queue_id
                         OFFSET 0) AS a;
    IF known_ids IS NOT NULL THEN
        UPDATE pg_temp.cm_batch b
           SET unclaimed = TRUE
          FROM unnest(known_ids, known_txns) AS k(queue_id, txn_id)
         WHERE k.queue_id = b.queue_id AND (k.txn_id = b.txn_id OR k.txn_id IS NULL);
        GET DIAGNOSTICS left_over = ROW_COUNT;
        WITH noticed AS (
            INSERT INTO consistency.reused_entries AS r
                   (queue, queue_id, earlier_txn_id, uuid, txn_id, account_number, status, cycle)
            SELECT DISTINCT ON (b.queue_id)
                   p_queue, b.queue_id, k.txn_id, b.uuid, b.txn_id, b.account_number, b.status, p_cycle
              FROM pg_temp.cm_batch b
              JOIN unnest(known_ids, known_txns, known_at) AS k(queue_id, txn_id, applied_at)
                ON k.queue_id = b.queue_id
             WHERE NOT b.unclaimed AND NOT coalesce(b.status = ANY (p_open), FALSE)
             ORDER BY b.queue_id, k.applied_at DESC
                ON CONFLICT DO NOTHING
            RETURNING r.queue_id, r.earlier_txn_id, r.uuid, r.txn_id, r.account_number, r.status
        ), journaled AS (
            INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, reason, cycle)
            SELECT p_queue, n.queue_id, n.account_number, 'reused', n.status,
                   format('the queue row applied before as portfolio transaction %s now carries %s: a new entry',
                          n.earlier_txn_id, coalesce(n.txn_id::text, quote_literal(n.uuid), 'no uuid')),
                   p_cycle
              FROM noticed n
             ORDER BY n.queue_id
        )
        SELECT count(*) INTO reused FROM noticed;
    END IF;
    UPDATE pg_temp.cm_batch b
       SET unclaimed = TRUE
     WHERE NOT b.unclaimed AND (b.status = ANY (p_terminal)) IS NOT TRUE;
    GET DIAGNOSTICS marked = ROW_COUNT;
    left_over := left_over + marked;
    BEGIN
        INSERT INTO consistency.applied_entries (queue, queue_id, uuid, txn_id, status)
        SELECT p_queue, b.queue_id, NULLIF(b.uuid, b.txn_id::text), b.txn_id, b.status
          FROM pg_temp.cm_batch b
         WHERE NOT b.unclaimed;
    EXCEPTION WHEN unique_violation THEN
        WITH claimed AS (
            INSERT INTO consistency.applied_entries (queue, queue_id, uuid, txn_id, status)
            SELECT p_queue, b.queue_id, NULLIF(b.uuid, b.txn_id::text), b.txn_id, b.status
              FROM pg_temp.cm_batch b
             WHERE NOT b.unclaimed
             ORDER BY b.updated_at, b.queue_id
                ON CONFLICT DO NOTHING
            RETURNING queue_id
        )
        UPDATE pg_temp.cm_batch b
           SET unclaimed = TRUE
         WHERE NOT b.unclaimed
           AND NOT EXISTS (SELECT 1 FROM claimed c WHERE c.queue_id = b.queue_id);
        GET DIAGNOSTICS marked = ROW_COUNT;
        left_over := left_over + marked;
    END;
END
$$;

-- Claims the batch's entries as claim_batch_v5 does, recording them by record_batch_v4, and gathers the batch
-- table's statistics when there are none as well as when the batch's size is twice or half theirs.
CREATE FUNCTION consistency.claim_batch_v6(
    p_queue TEXT, p_retrying BOOLEAN, p_terminal TEXT[], p_open TEXT[], p_cycle BIGINT,
    OUT corrected BIGINT, OUT reused BIGINT
)
LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
    target TEXT;
    analyzed REAL;
    described BOOLEAN;
    loaded BIGINT;
BEGIN
    corrected := 0;
    PERFORM 1
       FROM consistency.parked_entries p
       JOIN pg_temp.cm_batch b ON b.queue_id = p.queue_id
      WHERE p.queue = p_queue
      ORDER BY p.queue_id
        FOR UPDATE OF p;
    IF EXISTS (SELECT 1 FROM pg_temp.cm_batch WHERE txn_id IS NULL AND uuid IS NOT NULL) THEN
        BEGIN
            UPDATE pg_temp.cm_batch SET txn_id = uuid::uuid;
        EXCEPTION WHEN invalid_text_representation THEN
            UPDATE pg_temp.cm_batch SET txn_id = consistency.to_uuid(uuid);
        END;
    END IF;
    DELETE FROM pg_temp.cm_batch b
     USING consistency.resolved_entries r
     WHERE r.queue = p_queue AND r.queue_id = b.queue_id
       AND (r.uuid IS NOT DISTINCT FROM b.uuid OR consistency.to_uuid(r.uuid) = b.txn_id);
    IF NOT p_retrying THEN
        DELETE FROM pg_temp.cm_batch b
         USING consistency.parked_entries p
         WHERE p.queue = p_queue AND p.queue_id = b.queue_id;
    END IF;
    SELECT r.left_over, r.reused INTO left_over, reused
      FROM consistency.record_batch_v4(p_queue, p_terminal, p_open, p_cycle) AS r;
    -- The row count is written in place and outlives a rollback; the statistics are rows of pg_statistic, which
    -- a rolled-back clean try takes with it. So both are looked at.
    SELECT c.reltuples,
           EXISTS (SELECT 1 FROM pg_stats s WHERE s.schemaname = n.nspname AND s.tablename = c.relname)
      INTO analyzed, described
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = 'pg_temp.cm_batch'::regclass;
    SELECT count(*) INTO loaded FROM pg_temp.cm_batch;
    IF NOT described OR analyzed < 0 OR loaded > 2 * analyzed OR 2 * loaded < analyzed THEN
        target := current_setting('default_statistics_target');
        PERFORM set_config('default_statistics_target', '10', TRUE);
        ANALYZE pg_temp.cm_batch (queue_id, account_number, status, txn_id, reason, unclaimed);
        PERFORM set_config('default_statistics_target', target, TRUE);
    END IF;
    IF left_over > 0 THEN
        corrected := consistency.sort_unclaimed_v3(p_queue, p_terminal, p_open, p_cycle);
    END IF;
END
$$;

-- Takes the rows the batch needs as check_batch_v3 does, keeping where each portfolio lies too (compound_batch_v4
-- reads and updates it there), and gives each entry that cannot apply now the same reason. Portfolios and
-- transactions are taken through their primary key's index, never by a scan that searches the batch's list of
-- keys for each row of a table the planner takes for small (SET enable_seqscan = off), and the batch's sets are
-- joined by hashing (SET enable_nestloop = off).
CREATE FUNCTION consistency.check_batch_v4(p_queue TEXT, p_transaction_type TEXT) RETURNS VOID
LANGUAGE plpgsql
SET enable_nestloop = off
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    suspects INTEGER[];
BEGIN
    DELETE FROM pg_temp.cm_taken_portfolios;
    DELETE FROM pg_temp.cm_taken_transactions;
    INSERT INTO pg_temp.cm_taken_portfolios (accountid, row_id)
    SELECT accountid, ctid
      FROM user_portfolios
     WHERE accountid = ANY (ARRAY(SELECT account_number FROM pg_temp.cm_batch
                                   WHERE status = 'COMPLETED' AND reason IS NULL))
       FOR NO KEY UPDATE SKIP LOCKED;
    INSERT INTO pg_temp.cm_taken_transactions (row_id, id, accountid, transaction_type)
    SELECT ctid, id, accountid, transaction_type
      FROM portfolio_transactions
     WHERE id = ANY (ARRAY(SELECT txn_id FROM pg_temp.cm_batch WHERE reason IS NULL))
       FOR NO KEY UPDATE SKIP LOCKED;

    SELECT array_agg(me.queue_id) INTO suspects
      FROM pg_temp.cm_batch me
      LEFT JOIN pg_temp.cm_taken_transactions t
        ON t.id = me.txn_id AND t.accountid = me.account_number AND t.transaction_type = p_transaction_type
     WHERE me.reason IS NULL
       AND (t.id IS NULL
            OR (me.status = 'COMPLETED'
                AND (me.account_number IN (SELECT accountid FROM pg_temp.cm_taken_portfolios)) IS NOT TRUE));

    IF suspects IS NOT NULL THEN
        UPDATE pg_temp.cm_batch b
           SET reason = r.reason
          FROM (SELECT me.queue_id,
                       CASE
                           WHEN me.status = 'COMPLETED' AND NOT EXISTS (SELECT 1 FROM user_portfolios p
                                                                         WHERE p.accountid = me.account_number)
                               THEN 'no portfolio for account ' || coalesce(me.account_number, '(none)')
                           WHEN me.txn_id IS NULL THEN 'uuid is not a valid UUID'
                           WHEN t.id IS NULL AND NOT EXISTS (SELECT 1 FROM portfolio_transactions h
                                                              WHERE h.id = me.txn_id)
                               THEN 'no portfolio transaction with this id'
                           WHEN t.id IS NULL THEN 'waiting for a row lock on portfolio transaction ' || me.txn_id
                           WHEN t.accountid IS DISTINCT FROM me.account_number
                               THEN 'portfolio transaction belongs to account ' || t.accountid
                           WHEN t.transaction_type <> p_transaction_type
                               THEN format('portfolio transaction is %s, expected %s', t.transaction_type,
                                           p_transaction_type)
                           WHEN me.status = 'COMPLETED'
                                AND NOT (me.account_number IN (SELECT accountid FROM pg_temp.cm_taken_portfolios))
                               THEN 'waiting for a row lock on portfolio ' || me.account_number
                       END AS reason
                  FROM pg_temp.cm_batch me
                  LEFT JOIN pg_temp.cm_taken_transactions t ON t.id = me.txn_id
                 WHERE me.reason IS NULL
                   AND me.queue_id = ANY (suspects)) AS r
         WHERE r.reason IS NOT NULL
           AND b.queue_id = r.queue_id;
    END IF;

    IF EXISTS (SELECT 1 FROM pg_temp.cm_batch WHERE reason LIKE 'waiting for a row lock%')
       OR EXISTS (SELECT 1 FROM consistency.parked_entries
                   WHERE queue = p_queue AND reason LIKE 'waiting for a row lock%') THEN
        PERFORM consistency.wait_behind_locks(p_queue);
    END IF;
END
$$;

-- Takes the portfolios the batch's completed entries compound and refuses a batch that is not clean so far, as
-- check_clean_batch_v1 does, keeping where each portfolio lies, and taking them through the primary key's index as
-- check_batch_v4 does.
CREATE FUNCTION consistency.check_clean_batch_v2(p_queue TEXT) RETURNS VOID
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    taken BIGINT;
    wanted BIGINT;
BEGIN
    DELETE FROM pg_temp.cm_taken_portfolios;
    IF EXISTS (SELECT 1 FROM pg_temp.cm_batch
                WHERE reason IS NOT NULL OR unclaimed OR txn_id IS NULL
                   OR (status = 'COMPLETED' AND account_number IS NULL))
       OR EXISTS (SELECT 1 FROM consistency.parked_entries
                   WHERE queue = p_queue AND reason LIKE 'waiting for a row lock%') THEN
        RAISE EXCEPTION 'the batch is not clean' USING ERRCODE = 'CMB01';
    END IF;
    INSERT INTO pg_temp.cm_taken_portfolios (accountid, row_id)
    SELECT accountid, ctid
      FROM user_portfolios
     WHERE accountid = ANY (ARRAY(SELECT account_number FROM pg_temp.cm_batch WHERE status = 'COMPLETED'))
       FOR NO KEY UPDATE SKIP LOCKED;
    GET DIAGNOSTICS taken = ROW_COUNT;
    SELECT count(DISTINCT account_number) INTO wanted FROM pg_temp.cm_batch WHERE status = 'COMPLETED';
    IF taken <> wanted THEN
        RAISE EXCEPTION 'the batch is not clean: % of its % portfolios taken', taken, wanted
              USING ERRCODE = 'CMB01';
    END IF;
END
$$;

-- Compounds the batch's completed entries as compound_batch_v3 does, on the portfolios the check took: it reads
-- them where the check took them, in one scan of those addresses, and updates them there, instead of looking each
-- up twice in the primary key's index. Every join is a hash join: the batch is never read again per portfolio,
-- however few rows the planner expects. A portfolio the check did not take fails the step, as the database fails
-- a batch it cannot store: the step never leaves an entry it was given unapplied.
CREATE FUNCTION consistency.compound_batch_v4(
    p_queue TEXT, p_retrying BOOLEAN, p_columns TEXT, p_numerators NUMERIC[], p_denominators NUMERIC[],
    p_tier_version BIGINT, p_cycle BIGINT
) RETURNS VOID
LANGUAGE plpgsql
SET enable_nestloop = off
SET jit = off
AS $$
DECLARE
    compounded BIGINT;
    wanted BIGINT;
BEGIN
    WITH eligible AS (
        SELECT account_number COLLATE "C" AS account, array_agg(queue_id ORDER BY updated_at, queue_id) AS ids
          FROM pg_temp.cm_batch
         WHERE reason IS NULL AND status = 'COMPLETED'
         GROUP BY 1
    ), taken AS (
        SELECT p.ctid AS row_id, p.accountid,
               CASE p_columns
                   WHEN 'values' THEN ARRAY[p.tier1_value, p.tier2_value, p.tier3_value]
                   ELSE ARRAY[p.tier1_allocation, p.tier2_allocation, p.tier3_allocation]
               END AS amounts
          FROM user_portfolios p
         WHERE p.ctid = ANY (ARRAY(SELECT row_id FROM pg_temp.cm_taken_portfolios))
    ), computed AS (
        SELECT t.row_id, t.accountid, e.ids, t.amounts, c.result, c.applied, c.problem, c.after1, c.after2, c.after3
          FROM eligible e
          JOIN taken t ON t.accountid = e.account COLLATE "default"
         CROSS JOIN LATERAL consistency.compound_trail(t.amounts, p_numerators, p_denominators, cardinality(e.ids)) AS c
    ), blocked AS (
        -- Only the portfolios where a step could not be stored: usually none. Their entries are listed first, so
        -- that the batch is read once for all of them, not once per portfolio.
        UPDATE pg_temp.cm_batch b
           SET reason = u.problem
          FROM (SELECT unnest(c.ids[c.applied + 1:]) AS queue_id, c.problem FROM computed c
                 WHERE c.problem IS NOT NULL) AS u
         WHERE b.queue_id = u.queue_id
    ), journaled AS (
        INSERT INTO consistency.journal
               (queue, queue_id, account_number, kind, status, attempts, tier1_before, tier2_before, tier3_before,
                tier1_after, tier2_after, tier3_after, tier_version, cycle)
        SELECT p_queue, s.queue_id, s.accountid, 'applied', 'COMPLETED',
               CASE WHEN p_retrying THEN (SELECT p.attempts FROM consistency.parked_entries p
                                           WHERE p.queue = p_queue AND p.queue_id = s.queue_id) END,
               s.before1, s.before2, s.before3, s.after1, s.after2, s.after3, p_tier_version, p_cycle
          FROM (SELECT c.accountid, unnest(c.ids[1:c.applied]) AS queue_id,
                       unnest(c.amounts[1] || c.after1[1:c.applied - 1]) AS before1,
                       unnest(c.amounts[2] || c.after2[1:c.applied - 1]) AS before2,
                       unnest(c.amounts[3] || c.after3[1:c.applied - 1]) AS before3,
                       unnest(c.after1) AS after1, unnest(c.after2) AS after2, unnest(c.after3) AS after3
                  FROM computed c
                 WHERE c.applied > 0) AS s
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
     WHERE p.ctid = c.row_id AND c.applied > 0
       AND p.ctid = ANY (ARRAY(SELECT row_id FROM computed WHERE applied > 0));
    GET DIAGNOSTICS compounded = ROW_COUNT;
    -- Each account whose completed entries still apply is one whose portfolio was just compounded.
    SELECT count(DISTINCT account_number) INTO wanted
      FROM pg_temp.cm_batch
     WHERE reason IS NULL AND status = 'COMPLETED';
    IF compounded <> wanted THEN
        RAISE EXCEPTION 'compound_batch_v4 compounded % of the % portfolios the batch applies to', compounded, wanted
              USING ERRCODE = 'data_exception';
    END IF;
END
$$;

-- Settles the batch as settle_batch_v3 does. The transactions are read where check_batch_v4 took them, in one scan
-- of those addresses, and joined to the batch by their id with a hash join; one not found there fails the step.
CREATE FUNCTION consistency.settle_batch_v4(p_queue TEXT, p_terminal TEXT[], p_mirrored TEXT[], p_cycle BIGINT)
RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql
SET enable_nestloop = off
SET jit = off
AS $$
DECLARE
    mirrored BIGINT;
    claimed BIGINT;
BEGIN
    DELETE FROM consistency.applied_entries a
     WHERE a.queue = p_queue
       AND a.queue_id = ANY (ARRAY(SELECT queue_id FROM pg_temp.cm_batch WHERE reason IS NOT NULL AND NOT unclaimed))
       AND EXISTS (SELECT 1 FROM pg_temp.cm_batch b
                    WHERE b.queue_id = a.queue_id AND b.txn_id IS NOT DISTINCT FROM a.txn_id
                      AND b.reason IS NOT NULL AND NOT b.unclaimed);
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
     WHERE b.reason IS NULL AND t.id = b.txn_id
       AND t.ctid = ANY (ARRAY(SELECT row_id FROM pg_temp.cm_taken_transactions));
    GET DIAGNOSTICS mirrored = ROW_COUNT;
    SELECT count(DISTINCT txn_id) INTO claimed FROM pg_temp.cm_batch WHERE reason IS NULL;
    IF mirrored <> claimed THEN
        RAISE EXCEPTION 'settle_batch_v4 mirrored % of the % portfolio transactions the batch settles', mirrored,
              claimed USING ERRCODE = 'data_exception';
    END IF;

    RETURN QUERY
        SELECT CASE WHEN b.reason IS NULL THEN b.status ELSE 'parked' END, count(*)
          FROM pg_temp.cm_batch b
         GROUP BY 1;
END
$$;
