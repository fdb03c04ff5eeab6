-- Money moves per portfolio transaction, so the exactly-once record holds at most one entry per
-- transaction, whatever queue rows name it; settled entries the queue changes afterwards are kept as
-- corrections; entries with a status outside the known five are parked.

-- The portfolio transaction each applied entry settled (from now on, uuid holds the queue's spelling only
-- where it differs from txn_id's). Unique: a second queue row naming a transaction
-- already settled cannot claim it, in one batch or across batches, processes and restarts. Entries
-- recorded before this migration get theirs here; where several named one transaction, the first
-- recorded keeps it and the later ones keep none.
ALTER TABLE consistency.applied_entries ADD COLUMN txn_id UUID;
UPDATE consistency.applied_entries a
   SET txn_id = f.txn_id
  FROM (SELECT DISTINCT ON (consistency.to_uuid(uuid)) queue, queue_id, consistency.to_uuid(uuid) AS txn_id
          FROM consistency.applied_entries
         WHERE consistency.to_uuid(uuid) IS NOT NULL
         ORDER BY consistency.to_uuid(uuid), applied_at, queue, queue_id) AS f
 WHERE a.queue = f.queue AND a.queue_id = f.queue_id;
CREATE UNIQUE INDEX applied_entries_txn_id ON consistency.applied_entries (txn_id);

-- Applied entries whose queue status changed afterwards. The first outcome stays applied and nothing is
-- reversed: each row is a disagreement between the two databases, for a person to look at. It goes
-- away when the queue row returns to the status that was applied.
CREATE TABLE consistency.corrections (
    queue          TEXT NOT NULL,
    queue_id       INTEGER NOT NULL,
    uuid           TEXT,
    applied_status TEXT NOT NULL,
    queue_status   TEXT,
    first_seen_at  TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    noticed_at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (queue, queue_id)
);

-- An entry parked for its unknown status may have none at all.
ALTER TABLE consistency.parked_entries ALTER COLUMN status DROP NOT NULL;

-- Pods of the release before this one call apply_batch, which knows nothing of the transaction's
-- uniqueness; they stop applying, and say why, until they are replaced. Nothing is lost: their entries
-- stay behind the watermark for apply_batch_v2.
CREATE OR REPLACE FUNCTION consistency.apply_batch(
    p_queue TEXT, p_transaction_type TEXT, p_columns TEXT, p_retrying BOOLEAN,
    p_numerators NUMERIC[], p_denominators NUMERIC[]
) RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consistency.apply_batch is retired by migration 3; this process runs an older release'
        USING ERRCODE = 'feature_not_supported';
END
$$;

-- Notes the batch's entries that were applied before: a status that now differs from the applied one is
-- kept as a correction (noticed_at marks the ones new or changed in this transaction), a status that
-- agrees again ends it. Those entries leave the batch. Returns how many corrections are new or changed.
CREATE FUNCTION consistency.note_corrections(p_queue TEXT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    noted BIGINT;
BEGIN
    WITH seen AS (
        DELETE FROM pg_temp.cm_batch b
         USING consistency.applied_entries a
         WHERE b.unclaimed AND a.queue = p_queue AND a.queue_id = b.queue_id
        RETURNING b.queue_id, b.uuid, b.status AS queue_status, a.status AS applied_status
    ), ended AS (
        DELETE FROM consistency.corrections k
         USING seen s
         WHERE k.queue = p_queue AND k.queue_id = s.queue_id AND s.queue_status = s.applied_status
    ), changed AS (
        INSERT INTO consistency.corrections AS k (queue, queue_id, uuid, applied_status, queue_status)
        SELECT p_queue, queue_id, uuid, applied_status, queue_status
          FROM seen
         WHERE queue_status IS DISTINCT FROM applied_status
            ON CONFLICT (queue, queue_id) DO UPDATE
           SET queue_status = EXCLUDED.queue_status, uuid = EXCLUDED.uuid, noticed_at = CURRENT_TIMESTAMP
         WHERE k.queue_status IS DISTINCT FROM EXCLUDED.queue_status
        RETURNING 1
    )
    SELECT count(*) INTO noted FROM changed;
    RETURN noted;
END
$$;

-- Applies the entries in pg_temp.cm_batch once each, in (updated_at, queue_id) order, at most one per
-- portfolio transaction: records them as applied, parks those that cannot apply with the reason, mirrors
-- the statuses of the others on their portfolio transactions and compounds the completed ones on their
-- portfolios' tier columns ('values' or 'allocations'). Entries parked before are skipped unless
-- retrying. Returns how many entries had each outcome (their status, or 'parked'), and how many
-- corrections are new ('corrected').
CREATE FUNCTION consistency.apply_batch_v2(
    p_queue TEXT, p_transaction_type TEXT, p_columns TEXT, p_retrying BOOLEAN,
    p_numerators NUMERIC[], p_denominators NUMERIC[]
) RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    corrected BIGINT := 0;
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

    -- The exactly-once record: an entry stays in the batch only if this transaction records it first,
    -- under its (queue, queue_id) and under its portfolio transaction. The uuid as the queue spelled it is
    -- kept only where it is not the transaction's own spelling: a narrower row for the common case.
    WITH claimed AS (
        INSERT INTO consistency.applied_entries (queue, queue_id, uuid, txn_id, status)
        SELECT p_queue, b.queue_id, NULLIF(b.uuid, b.txn_id::text), b.txn_id, b.status
          FROM pg_temp.cm_batch b
         WHERE b.status IN ('COMPLETED', 'FAILED', 'CANCELLED')
         ORDER BY b.updated_at, b.queue_id
            ON CONFLICT DO NOTHING
        RETURNING queue_id
    )
    UPDATE pg_temp.cm_batch b
       SET unclaimed = TRUE
     WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.queue_id = b.queue_id);
    GET DIAGNOSTICS left_over = ROW_COUNT;
    -- Row counts for the planner: the statements below join this batch to large tables.
    ANALYZE pg_temp.cm_batch;
    IF left_over > 0 THEN
        corrected := consistency.note_corrections(p_queue);
        -- What is left unclaimed and not open cannot apply: a terminal entry names a transaction another entry
        -- settled, and a status outside the known five is never applied, nor skipped without a word.
        UPDATE pg_temp.cm_batch b
           SET reason = CASE WHEN b.status IN ('COMPLETED', 'FAILED', 'CANCELLED')
                             THEN 'portfolio transaction already settled by '
                                  || coalesce((SELECT a.queue || ' entry ' || a.queue_id
                                                 FROM consistency.applied_entries a
                                                WHERE a.txn_id = b.txn_id), 'another entry')
                             ELSE 'unknown status ' || coalesce(quote_literal(b.status), 'NULL')
                        END
         WHERE b.unclaimed AND b.status IS DISTINCT FROM 'PENDING' AND b.status IS DISTINCT FROM 'PROCESSING';
        DELETE FROM pg_temp.cm_batch WHERE unclaimed AND reason IS NULL;
    END IF;

    -- What UPDATE itself takes, in a fixed order: foreign-key inserts of transactions are not blocked.
    PERFORM 1
       FROM user_portfolios
      WHERE accountid = ANY (ARRAY(SELECT account_number FROM pg_temp.cm_batch
                                    WHERE status = 'COMPLETED' AND reason IS NULL))
      ORDER BY accountid
        FOR NO KEY UPDATE;

    -- Why an entry cannot be applied now, checked in this order; only blocked entries are written. The
    -- transactions are looked up by index, however many rows their table holds.
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

    -- Completed entries compound on their portfolio, one at a time, in order; the ones after a step
    -- that cannot be stored are parked with its reason.
    WITH eligible AS (
        SELECT account_number, count(*)::INTEGER AS k
          FROM pg_temp.cm_batch
         WHERE reason IS NULL AND status = 'COMPLETED'
         GROUP BY account_number
    ), computed AS (
        SELECT p.accountid, c.result, c.applied, c.problem
          FROM eligible e
          JOIN user_portfolios p ON p.accountid = e.account_number
         CROSS JOIN LATERAL consistency.compound(
               CASE p_columns
                   WHEN 'values' THEN ARRAY[p.tier1_value, p.tier2_value, p.tier3_value]
                   ELSE ARRAY[p.tier1_allocation, p.tier2_allocation, p.tier3_allocation]
               END,
               p_numerators, p_denominators, e.k) AS c
    ), ranked AS (
        SELECT queue_id, account_number,
               row_number() OVER (PARTITION BY account_number ORDER BY updated_at, queue_id) AS n
          FROM pg_temp.cm_batch
         WHERE reason IS NULL AND status = 'COMPLETED'
    ), blocked AS (
        UPDATE pg_temp.cm_batch b
           SET reason = c.problem
          FROM ranked r
          JOIN computed c ON c.accountid = r.account_number
         WHERE b.queue_id = r.queue_id AND r.n > c.applied
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

    -- Parked entries give their record back, if they had claimed one, and wait for a retry.
    DELETE FROM consistency.applied_entries a
     USING pg_temp.cm_batch b
     WHERE b.reason IS NOT NULL AND NOT b.unclaimed
       AND a.queue = p_queue AND a.queue_id = b.queue_id;
    PERFORM consistency.park_batch(p_queue);

    -- Applied entries leave the parked list and give their outcome to their transactions, which no other
    -- entry can have settled: the unique record above says so.
    DELETE FROM consistency.parked_entries p
     USING pg_temp.cm_batch b
     WHERE b.reason IS NULL
       AND p.queue = p_queue AND p.queue_id = b.queue_id;
    UPDATE portfolio_transactions t
       SET status = CASE b.status WHEN 'COMPLETED' THEN 'PROCESSED' ELSE b.status END,
           updated_at = CURRENT_TIMESTAMP
      FROM pg_temp.cm_batch b
     WHERE b.reason IS NULL
       AND t.id = b.txn_id
       AND t.id = ANY (ARRAY(SELECT txn_id FROM pg_temp.cm_batch WHERE reason IS NULL));

    RETURN QUERY
        SELECT CASE WHEN b.reason IS NULL THEN b.status ELSE 'parked' END, count(*)
          FROM pg_temp.cm_batch b
         GROUP BY 1
        UNION ALL
        SELECT 'corrected', corrected WHERE corrected > 0;
END
$$;
