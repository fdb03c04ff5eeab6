-- The set-based apply as four named steps, each versioned the way procrastinate versions its functions:
-- a later release adds claim_batch_v2 beside claim_batch_v1 while pods of this one still call _v1, and a
-- migration after the rollout drops _v1. The service calls them in order, in one transaction, on the
-- session's pg_temp.cm_batch (see create_batch_table in sql/queries.sql): claim, check, compound, settle.
-- They do what consistency.apply_batch_v2 does, which stays for pods of the previous release. Which
-- statuses are terminal, open and mirrored comes in as parameters, from domain.py.

-- Claims the batch's terminal entries, once per entry and once per portfolio transaction, in
-- (updated_at, queue_id) order, and gives what is left unclaimed and not open its reason. Returns the
-- corrections noted.
CREATE FUNCTION consistency.claim_batch_v1(p_queue TEXT, p_retrying BOOLEAN, p_terminal TEXT[], p_open TEXT[])
RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
BEGIN
    IF NOT p_retrying THEN
        DELETE FROM pg_temp.cm_batch b
         USING consistency.parked_entries p
         WHERE p.queue = p_queue AND p.queue_id = b.queue_id;
    END IF;

    -- Each entry's uuid as a UUID: one plain cast when every uuid in the batch takes it, else entry by entry.
    BEGIN
        UPDATE pg_temp.cm_batch SET txn_id = uuid::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        UPDATE pg_temp.cm_batch SET txn_id = consistency.to_uuid(uuid);
    END;

    left_over := consistency.record_batch_v1(p_queue, p_terminal);
    -- Row counts for the planner: the statements after this join the batch to large tables. Only the
    -- columns they filter, group and join on: the others cost as much to analyze and no plan reads them.
    ANALYZE pg_temp.cm_batch (queue_id, account_number, status, txn_id, reason, unclaimed);
    IF left_over = 0 THEN
        RETURN 0;
    END IF;
    RETURN consistency.sort_unclaimed_v1(p_queue, p_terminal, p_open);
END
$$;

-- Records the batch's terminal entries as applied, under (queue, queue_id) and under the portfolio
-- transaction, and marks the others unclaimed; returns how many it marked. The queue's spelling of the
-- uuid is kept only where it is not the transaction's own.
CREATE FUNCTION consistency.record_batch_v1(p_queue TEXT, p_terminal TEXT[]) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
BEGIN
    -- Most batches name no transaction recorded before, and none twice. For them a plain INSERT of the
    -- entries not recorded yet searches the index on the transaction (a random key) once per entry, where
    -- ON CONFLICT searches it twice. A conflict (with a row recorded before, by another process or in this
    -- batch) raises and undoes the block; the statement after it then resolves each as ON CONFLICT does,
    -- the first entry in (updated_at, queue_id) order keeping the transaction. The indexes decide, in both.
    BEGIN
        WITH claimed AS (
            INSERT INTO consistency.applied_entries (queue, queue_id, uuid, txn_id, status)
            SELECT p_queue, b.queue_id, NULLIF(b.uuid, b.txn_id::text), b.txn_id, b.status
              FROM pg_temp.cm_batch b
             WHERE b.status = ANY (p_terminal)
               AND b.queue_id NOT IN (SELECT a.queue_id
                                        FROM consistency.applied_entries a
                                       WHERE a.queue = p_queue
                                         AND a.queue_id = ANY (ARRAY(SELECT queue_id FROM pg_temp.cm_batch)))
             ORDER BY b.updated_at, b.queue_id
            RETURNING queue_id
        )
        UPDATE pg_temp.cm_batch b
           SET unclaimed = TRUE
         WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.queue_id = b.queue_id);
        GET DIAGNOSTICS left_over = ROW_COUNT;
    EXCEPTION WHEN unique_violation THEN
        WITH claimed AS (
            INSERT INTO consistency.applied_entries (queue, queue_id, uuid, txn_id, status)
            SELECT p_queue, b.queue_id, NULLIF(b.uuid, b.txn_id::text), b.txn_id, b.status
              FROM pg_temp.cm_batch b
             WHERE b.status = ANY (p_terminal)
             ORDER BY b.updated_at, b.queue_id
                ON CONFLICT DO NOTHING
            RETURNING queue_id
        )
        UPDATE pg_temp.cm_batch b
           SET unclaimed = TRUE
         WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.queue_id = b.queue_id);
        GET DIAGNOSTICS left_over = ROW_COUNT;
    END;
    RETURN left_over;
END
$$;

-- Sorts the entries the claim left: those applied before leave the batch as corrections (or their end),
-- open ones leave it silently, and the others get their reason. Returns the corrections noted.
CREATE FUNCTION consistency.sort_unclaimed_v1(p_queue TEXT, p_terminal TEXT[], p_open TEXT[])
RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    corrected BIGINT;
BEGIN
    corrected := consistency.note_corrections(p_queue);
    -- A terminal entry left unclaimed names a transaction another entry settled; a status outside the
    -- known ones is never applied, nor skipped without a word.
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

-- Locks the portfolios the batch's completed entries compound, then gives each entry that cannot apply
-- now its reason, checked in this order.
CREATE FUNCTION consistency.check_batch_v1(p_transaction_type TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    -- What UPDATE itself takes, in a fixed order: foreign-key inserts of transactions are not blocked.
    PERFORM 1
       FROM user_portfolios
      WHERE accountid = ANY (ARRAY(SELECT account_number FROM pg_temp.cm_batch
                                    WHERE status = 'COMPLETED' AND reason IS NULL))
      ORDER BY accountid
        FOR NO KEY UPDATE;

    -- Only blocked entries are written. The transactions are looked up by index, however many rows
    -- their table holds.
    UPDATE pg_temp.cm_batch b
       SET reason = r.reason
      FROM (SELECT me.queue_id,
                   CASE
                       WHEN me.status = 'COMPLETED' AND NOT EXISTS (SELECT 1 FROM user_portfolios p
                                                                     WHERE p.accountid = me.account_number)
                           THEN 'no portfolio for account ' || coalesce(me.account_number, '(none)')
                       WHEN me.txn_id IS NULL THEN 'uuid is not a valid UUID'
                       WHEN t.id IS NULL THEN 'no portfolio transaction with this id'
                       WHEN t.accountid IS DISTINCT FROM me.account_number
                           THEN 'portfolio transaction belongs to account ' || t.accountid
                       WHEN t.transaction_type <> p_transaction_type
                           THEN format('portfolio transaction is %s, expected %s', t.transaction_type,
                                       p_transaction_type)
                   END AS reason
              FROM pg_temp.cm_batch me
              LEFT JOIN portfolio_transactions t
                ON t.id = me.txn_id
               AND t.id = ANY (ARRAY(SELECT txn_id FROM pg_temp.cm_batch WHERE reason IS NULL))
             WHERE me.reason IS NULL) AS r
     WHERE r.reason IS NOT NULL
       AND b.queue_id = r.queue_id;
END
$$;

-- Compounds the batch's completed entries on their portfolios' tier columns ('values' or 'allocations'),
-- one at a time, in order; the ones after a step that cannot be stored get its reason.
CREATE FUNCTION consistency.compound_batch_v1(p_columns TEXT, p_numerators NUMERIC[], p_denominators NUMERIC[])
RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    WITH eligible AS (
        SELECT account_number, count(*)::INTEGER AS k
          FROM pg_temp.cm_batch
         WHERE reason IS NULL AND status = 'COMPLETED'
         GROUP BY account_number
    ), computed AS (
        SELECT p.accountid, c.result, c.applied, c.problem, e.k
          FROM eligible e
          JOIN user_portfolios p ON p.accountid = e.account_number
         CROSS JOIN LATERAL consistency.compound(
               CASE p_columns
                   WHEN 'values' THEN ARRAY[p.tier1_value, p.tier2_value, p.tier3_value]
                   ELSE ARRAY[p.tier1_allocation, p.tier2_allocation, p.tier3_allocation]
               END,
               p_numerators, p_denominators, e.k) AS c
    ), ranked AS (
        -- Only the portfolios where a step could not be stored: usually none.
        SELECT b.queue_id, c.applied, c.problem,
               row_number() OVER (PARTITION BY b.account_number ORDER BY b.updated_at, b.queue_id) AS n
          FROM pg_temp.cm_batch b
          JOIN computed c ON c.accountid = b.account_number AND c.applied < c.k
         WHERE b.reason IS NULL AND b.status = 'COMPLETED'
    ), blocked AS (
        UPDATE pg_temp.cm_batch b
           SET reason = r.problem
          FROM ranked r
         WHERE b.queue_id = r.queue_id AND r.n > r.applied
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

-- Parks the entries that have a reason, giving back their records, and gives the others' outcomes to
-- their portfolio transactions (p_mirrored[i] for p_terminal[i]). Returns how many entries had each
-- outcome: their status, or 'parked'.
CREATE FUNCTION consistency.settle_batch_v1(p_queue TEXT, p_terminal TEXT[], p_mirrored TEXT[])
RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    -- By index, whatever the planner believes of the ledger's queues.
    DELETE FROM consistency.applied_entries
     WHERE queue = p_queue
       AND queue_id = ANY (ARRAY(SELECT queue_id FROM pg_temp.cm_batch WHERE reason IS NOT NULL AND NOT unclaimed));
    PERFORM consistency.park_batch(p_queue);

    -- No other entry can have settled these transactions: the unique record of the claim says so.
    DELETE FROM consistency.parked_entries p
     USING pg_temp.cm_batch b
     WHERE b.reason IS NULL
       AND p.queue = p_queue AND p.queue_id = b.queue_id;
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
