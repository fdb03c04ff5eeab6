-- A clean batch takes a shorter way. A batch is clean when every entry claimed can apply now: its uuid is a
-- UUID, its portfolio (when it completed) exists and is free, its transaction exists, is of its account and
-- of the queue's type and is not held, and no step of its portfolio would be negative or overflow. Nearly
-- every batch of a drain is. Such a batch needs no transaction row taken ahead of its update, which costs a
-- tuple lock and its WAL record per entry: settle_clean_batch_v1 updates the transactions at once, by id,
-- waiting at most a moment for a row another session holds.
--
-- Each clean step refuses, with SQLSTATE CMB01, a batch that is not clean, and the service then undoes the
-- clean try and applies the batch by the careful steps (check_batch_v3 and settle_batch_v3), which give
-- every entry that cannot apply its reason. claim_batch_v4 (below) and compound_batch_v3 serve both ways. So a
-- clean batch ends as the careful steps would end it, and any other batch is applied by them.

-- Takes the portfolios the batch's completed entries compound, as check_batch_v3 does, and refuses a batch
-- that is not clean so far: an entry the claim gave a reason or left unclaimed, a uuid that is not a UUID, a
-- portfolio missing or held, or any parked entry of the queue waiting for a row lock (later entries of its
-- account wait behind it, which only the careful check works out).
CREATE FUNCTION consistency.check_clean_batch_v1(p_queue TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
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
    INSERT INTO pg_temp.cm_taken_portfolios (accountid)
    SELECT accountid
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

-- Settles a clean batch as settle_batch_v3 settles it, and refuses one that compound_batch_v3 found a step
-- of which it could not store, or whose transactions are not all there to update: one missing, of another
-- account or type, or held by another session for longer than a moment.
CREATE FUNCTION consistency.settle_clean_batch_v1(
    p_queue TEXT, p_transaction_type TEXT, p_terminal TEXT[], p_mirrored TEXT[], p_cycle BIGINT
) RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    waits TEXT := current_setting('lock_timeout');
    mirrored BIGINT;
    claimed BIGINT;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_temp.cm_batch WHERE reason IS NOT NULL) THEN
        RAISE EXCEPTION 'the batch is not clean: a step could not be stored' USING ERRCODE = 'CMB01';
    END IF;

    -- A row held only a moment is waited for; one held longer makes the batch not clean.
    PERFORM set_config('lock_timeout', '100ms', TRUE);
    BEGIN
        UPDATE portfolio_transactions t
           SET status = p_mirrored[array_position(p_terminal, b.status)],
               updated_at = CURRENT_TIMESTAMP
          FROM pg_temp.cm_batch b
         WHERE t.id = b.txn_id AND t.accountid = b.account_number AND t.transaction_type = p_transaction_type
           AND t.id = ANY (ARRAY(SELECT txn_id FROM pg_temp.cm_batch));
        GET DIAGNOSTICS mirrored = ROW_COUNT;
    EXCEPTION WHEN lock_not_available THEN
        RAISE EXCEPTION 'the batch is not clean: a transaction is held by another session' USING ERRCODE = 'CMB01';
    END;
    PERFORM set_config('lock_timeout', waits, TRUE);
    -- The claim left no transaction named twice: a second entry naming one gets a reason.
    SELECT count(*) INTO claimed FROM pg_temp.cm_batch;
    IF mirrored <> claimed THEN
        RAISE EXCEPTION 'the batch is not clean: % of its % transactions found', mirrored, claimed
              USING ERRCODE = 'CMB01';
    END IF;

    WITH ended AS (
        DELETE FROM consistency.parked_entries p
         USING pg_temp.cm_batch b
         WHERE p.queue = p_queue AND p.queue_id = b.queue_id
        RETURNING p.queue_id, p.attempts
    )
    INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, attempts, cycle)
    SELECT p_queue, b.queue_id, b.account_number, 'applied', b.status, e.attempts, p_cycle
      FROM pg_temp.cm_batch b
      LEFT JOIN ended e ON e.queue_id = b.queue_id
     WHERE b.status <> 'COMPLETED'
     ORDER BY b.updated_at, b.queue_id;

    RETURN QUERY
        SELECT b.status, count(*)
          FROM pg_temp.cm_batch b
         GROUP BY 1;
END
$$;

-- Records the batch's terminal entries as record_batch_v1 does, and marks the others unclaimed; returns how
-- many it marked. What cannot be claimed is marked first: the entries not settled, and those recorded
-- before. The others are then inserted in any order, with no second pass over what was inserted, unless one
-- conflicts after all (its transaction recorded before, or named twice in the batch, or the entry recorded
-- meanwhile by another process): they are then recorded as record_batch_v1 records them, in (updated_at,
-- queue_id) order, the first keeping the transaction.
CREATE FUNCTION consistency.record_batch_v2(p_queue TEXT, p_terminal TEXT[]) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
    refused BIGINT;
BEGIN
    UPDATE pg_temp.cm_batch b
       SET unclaimed = TRUE
     WHERE (b.status = ANY (p_terminal)) IS NOT TRUE
        OR b.queue_id IN (SELECT a.queue_id
                            FROM consistency.applied_entries a
                           WHERE a.queue = p_queue
                             AND a.queue_id = ANY (ARRAY(SELECT queue_id FROM pg_temp.cm_batch)));
    GET DIAGNOSTICS left_over = ROW_COUNT;
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
        GET DIAGNOSTICS refused = ROW_COUNT;
        left_over := left_over + refused;
    END;
    RETURN left_over;
END
$$;

-- Claims the batch's entries as claim_batch_v3 does, recording them by record_batch_v2. It works out the
-- transaction ids only of a batch that came without them, and gathers the batch table's statistics again only
-- when the batch is of another size than the one they describe: a batch's statistics, and the plans made for
-- them, then serve the next batches of a drain.
CREATE FUNCTION consistency.claim_batch_v4(
    p_queue TEXT, p_retrying BOOLEAN, p_terminal TEXT[], p_open TEXT[], p_cycle BIGINT
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
    target TEXT;
    analyzed REAL;
    loaded BIGINT;
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
    -- A batch copied out of queue-db comes with its transaction ids (copy_into_batch in sql/queries.sql) unless
    -- one of its uuids is not a UUID.
    IF EXISTS (SELECT 1 FROM pg_temp.cm_batch WHERE txn_id IS NULL AND uuid IS NOT NULL) THEN
        BEGIN
            UPDATE pg_temp.cm_batch SET txn_id = uuid::uuid;
        EXCEPTION WHEN invalid_text_representation THEN
            UPDATE pg_temp.cm_batch SET txn_id = consistency.to_uuid(uuid);
        END;
    END IF;
    left_over := consistency.record_batch_v2(p_queue, p_terminal);
    -- The statistics of a batch of about the same size are good for this one: the planner scales their row
    -- count to the table's pages. So they are gathered again only when the size is twice or half theirs.
    SELECT reltuples INTO analyzed FROM pg_class WHERE oid = 'pg_temp.cm_batch'::regclass;
    SELECT count(*) INTO loaded FROM pg_temp.cm_batch;
    IF analyzed < 0 OR loaded > 2 * analyzed OR 2 * loaded < analyzed THEN
        target := current_setting('default_statistics_target');
        PERFORM set_config('default_statistics_target', '10', TRUE);
        ANALYZE pg_temp.cm_batch (queue_id, account_number, status, txn_id, reason, unclaimed);
        PERFORM set_config('default_statistics_target', target, TRUE);
    END IF;
    IF left_over = 0 THEN
        RETURN 0;
    END IF;
    RETURN consistency.sort_unclaimed_v2(p_queue, p_terminal, p_open, p_cycle);
END
$$;

-- compound_batch_v3 reading the batch's portfolios by the primary key's index, however many portfolios there
-- are, rather than by a scan of them all: the same results, so the step keeps its name, for pods of the
-- previous release too.
CREATE OR REPLACE FUNCTION consistency.compound_batch_v3(
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
                                AND p.accountid = ANY (ARRAY(SELECT account COLLATE "default" FROM eligible))
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

-- compound_trail with fewer statements per step: the same numbers, scale included, at less cost per entry. A
-- step that cannot be stored leaves the amounts of the step before it, which the trail already holds.
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
BEGIN
    applied := k;
    after1 := '{}';
    after2 := '{}';
    after3 := '{}';
    FOR i IN 1..k LOOP
        c1 := sign(c1 * n1) * div(2 * abs(c1 * n1) + d1, e1);
        c2 := sign(c2 * n2) * div(2 * abs(c2 * n2) + d2, e2);
        c3 := sign(c3 * n3) * div(2 * abs(c3 * n3) + d3, e3);
        IF c1 < 0 OR c2 < 0 OR c3 < 0 OR c1 + c2 + c3 >= 1e15 THEN
            applied := i - 1;
            problem := CASE WHEN c1 < 0 OR c2 < 0 OR c3 < 0 THEN 'result would be negative'
                            ELSE 'result would overflow NUMERIC(15,2)' END;
            EXIT;
        END IF;
        after1 := after1 || c1 * 0.01;
        after2 := after2 || c2 * 0.01;
        after3 := after3 || c3 * 0.01;
    END LOOP;
    IF applied = 0 THEN
        result := ARRAY[amounts[1], amounts[2], amounts[3]];
    ELSE
        result := ARRAY[after1[applied], after2[applied], after3[applied]];
    END IF;
END
$$;
