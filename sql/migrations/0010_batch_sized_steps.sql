-- Steps that cost less per entry:
-- - claim_batch_v3 gathers the batch table's statistics from a sample of 3,000 rows, not 30,000;
-- - check_batch_v3 keeps where each transaction row it takes lies (its ctid, which stays valid while the
--   batch's transaction holds the row locked), and works out the full list of reasons only for the few
--   entries that fail a join with the rows taken;
-- - settle_batch_v3 updates the transactions by where they lie, instead of looking each up again in the
--   primary key's index;
-- - compound_batch_v3 writes the journal records straight from each portfolio's steps, and compound_trail
--   counts in whole cents.
-- Each gives what the step before it gave. The service calls the v3 steps in place of the v2 ones, which
-- stay for pods of the previous release.

-- Claims the batch's entries as claim_batch_v2 does, with statistics of the batch table from a smaller sample.
CREATE FUNCTION consistency.claim_batch_v3(
    p_queue TEXT, p_retrying BOOLEAN, p_terminal TEXT[], p_open TEXT[], p_cycle BIGINT
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
    target TEXT;
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
    -- Row counts and the share of each status are what the plans need: a sample of 3,000 rows gives them, at a
    -- tenth of the cost of the default's 30,000.
    target := current_setting('default_statistics_target');
    PERFORM set_config('default_statistics_target', '10', TRUE);
    ANALYZE pg_temp.cm_batch (queue_id, account_number, status, txn_id, reason, unclaimed);
    PERFORM set_config('default_statistics_target', target, TRUE);
    IF left_over = 0 THEN
        RETURN 0;
    END IF;
    RETURN consistency.sort_unclaimed_v2(p_queue, p_terminal, p_open, p_cycle);
END
$$;

-- Takes the rows the batch needs as check_batch_v2 does, and gives each entry that cannot apply now the
-- same reason, in the same order of checks.
CREATE FUNCTION consistency.check_batch_v3(p_queue TEXT, p_transaction_type TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    suspects INTEGER[];
BEGIN
    DELETE FROM pg_temp.cm_taken_portfolios;
    DELETE FROM pg_temp.cm_taken_transactions;
    INSERT INTO pg_temp.cm_taken_portfolios (accountid)
    SELECT accountid
      FROM user_portfolios
     WHERE accountid = ANY (ARRAY(SELECT account_number FROM pg_temp.cm_batch
                                   WHERE status = 'COMPLETED' AND reason IS NULL))
       FOR NO KEY UPDATE SKIP LOCKED;
    INSERT INTO pg_temp.cm_taken_transactions (row_id, id, accountid, transaction_type)
    SELECT ctid, id, accountid, transaction_type
      FROM portfolio_transactions
     WHERE id = ANY (ARRAY(SELECT txn_id FROM pg_temp.cm_batch WHERE reason IS NULL))
       FOR NO KEY UPDATE SKIP LOCKED;

    -- An entry that can apply now has its transaction taken, of its account and of the queue's type, and,
    -- when it completed, its portfolio taken. The others are few, and only they are looked at again.
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

-- Settles the batch as settle_batch_v2 does, updating the transactions check_batch_v3 took by where they
-- lie: a scan of those addresses, which the batch's transaction holds locked, so that none has moved.
CREATE FUNCTION consistency.settle_batch_v3(p_queue TEXT, p_terminal TEXT[], p_mirrored TEXT[], p_cycle BIGINT)
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
      JOIN pg_temp.cm_taken_transactions k ON k.id = b.txn_id
     WHERE b.reason IS NULL
       AND t.ctid = k.row_id AND t.id = k.id
       AND t.ctid = ANY (ARRAY(SELECT row_id FROM pg_temp.cm_taken_transactions));

    RETURN QUERY
        SELECT CASE WHEN b.reason IS NULL THEN b.status ELSE 'parked' END, count(*)
          FROM pg_temp.cm_batch b
         GROUP BY 1;
END
$$;

-- Compounds the batch's completed entries as compound_batch_v2 does, and writes the same journal records,
-- taken from the arrays of each portfolio's steps row by row, without a table of them per portfolio.
CREATE FUNCTION consistency.compound_batch_v3(
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
        -- Each portfolio's records in the order its entries applied: set-returning functions in the select
        -- list give their elements in order, side by side, one row each, and nothing between them and the
        -- insert reorders rows. Only a retry looks up the attempts of the parkings it ends: a drain's batch
        -- holds no parked entry.
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
     WHERE p.accountid = c.accountid
       AND c.applied > 0;
END
$$;

-- The same steps as before, in whole cents: the division by 100 and the rounding of each step go, since cents
-- times an integer, rounded to an integer, are already exact. Every result, scale included, is as before.
CREATE OR REPLACE FUNCTION consistency.compound_trail(
    amounts NUMERIC[], numerators NUMERIC[], denominators NUMERIC[], k INTEGER,
    OUT result NUMERIC[], OUT applied INTEGER, OUT problem TEXT,
    OUT after1 NUMERIC[], OUT after2 NUMERIC[], OUT after3 NUMERIC[]
)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    c1 NUMERIC := amounts[1] * 100;
    c2 NUMERIC := amounts[2] * 100;
    c3 NUMERIC := amounts[3] * 100;
    n1 NUMERIC := numerators[1];
    n2 NUMERIC := numerators[2];
    n3 NUMERIC := numerators[3];
    d1 NUMERIC := denominators[1];
    d2 NUMERIC := denominators[2];
    d3 NUMERIC := denominators[3];
    e1 NUMERIC := 2 * denominators[1];
    e2 NUMERIC := 2 * denominators[2];
    e3 NUMERIC := 2 * denominators[3];
    s1 NUMERIC;
    s2 NUMERIC;
    s3 NUMERIC;
    y1 NUMERIC[] := '{}';
    y2 NUMERIC[] := '{}';
    y3 NUMERIC[] := '{}';
BEGIN
    applied := 0;
    WHILE applied < k LOOP
        -- Adding half the denominator before the integer division rounds half away from zero.
        s1 := c1 * n1;
        s2 := c2 * n2;
        s3 := c3 * n3;
        s1 := sign(s1) * div(2 * abs(s1) + d1, e1);
        s2 := sign(s2) * div(2 * abs(s2) + d2, e2);
        s3 := sign(s3) * div(2 * abs(s3) + d3, e3);
        IF s1 < 0 OR s2 < 0 OR s3 < 0 THEN
            problem := 'result would be negative';
            EXIT;
        END IF;
        IF s1 + s2 + s3 >= 1e15 THEN
            problem := 'result would overflow NUMERIC(15,2)';
            EXIT;
        END IF;
        c1 := s1;
        c2 := s2;
        c3 := s3;
        y1 := y1 || c1 * 0.01;
        y2 := y2 || c2 * 0.01;
        y3 := y3 || c3 * 0.01;
        applied := applied + 1;
    END LOOP;
    IF applied = 0 THEN
        result := ARRAY[amounts[1], amounts[2], amounts[3]];
    ELSE
        result := ARRAY[c1 * 0.01, c2 * 0.01, c3 * 0.01];
    END IF;
    after1 := y1;
    after2 := y2;
    after3 := y3;
END
$$;
