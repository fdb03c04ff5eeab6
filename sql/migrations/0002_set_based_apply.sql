-- Applying a batch inside the database: the entries are loaded into the session's pg_temp.cm_batch
-- (see create_batch_table in sql/queries.sql) and applied by a few set-based statements.

-- A queue entry's uuid as a UUID, or NULL when it is not one. Accepts what Python's uuid.UUID accepts
-- from hexadecimal text: any case, braces, hyphens and a urn:uuid: prefix.
CREATE FUNCTION consistency.to_uuid(entry_uuid TEXT) RETURNS UUID
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN hex ~ '^[0-9A-Fa-f]{32}$' THEN hex::uuid END
      FROM (SELECT replace(btrim(replace(replace(entry_uuid, 'urn:', ''), 'uuid:', ''), '{}'), '-', '')
                   AS hex) AS h
$$;

-- Applies k completed entries to one portfolio's three tier amounts, one at a time: each step multiplies
-- by numerators[i] / denominators[i] and rounds half away from zero to cents, exactly. Stops before the
-- first step whose result would be negative or reach NUMERIC(15,2)'s limit, and says why: every later
-- step would start from the same amounts and fail the same way.
CREATE FUNCTION consistency.compound(
    amounts NUMERIC[], numerators NUMERIC[], denominators NUMERIC[], k INTEGER,
    OUT result NUMERIC[], OUT applied INTEGER, OUT problem TEXT
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
        applied := applied + 1;
    END LOOP;
    result := ARRAY[t1, t2, t3];
END
$$;

-- Keeps the entries of pg_temp.cm_batch that have a reason in consistency.parked_entries, for a retry;
-- an entry parked before gets its new reason and one more attempt.
CREATE FUNCTION consistency.park_batch(p_queue TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
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
           last_attempt_at = CURRENT_TIMESTAMP;
END
$$;

-- Applies the terminal entries in pg_temp.cm_batch once each, in (updated_at, queue_id) order: records
-- them as applied, parks those that cannot apply with the reason, mirrors the statuses of the others on
-- their portfolio transactions and compounds the completed ones on their portfolios' tier columns
-- ('values' or 'allocations'). Entries parked before are skipped unless retrying. Returns how many
-- entries had each outcome: their status, or 'parked'.
CREATE FUNCTION consistency.apply_batch(
    p_queue TEXT, p_transaction_type TEXT, p_columns TEXT, p_retrying BOOLEAN,
    p_numerators NUMERIC[], p_denominators NUMERIC[]
) RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql AS $$
BEGIN
    -- The exactly-once record: only the entries this transaction records first stay in the batch.
    WITH claimed AS (
        INSERT INTO consistency.applied_entries (queue, queue_id, uuid, status)
        SELECT p_queue, b.queue_id, b.uuid, b.status
          FROM pg_temp.cm_batch b
         WHERE b.status IN ('COMPLETED', 'FAILED', 'CANCELLED')
           AND (p_retrying OR NOT EXISTS (SELECT 1 FROM consistency.parked_entries p
                                           WHERE p.queue = p_queue AND p.queue_id = b.queue_id))
         ORDER BY b.queue_id
            ON CONFLICT (queue, queue_id) DO NOTHING
        RETURNING queue_id
    )
    DELETE FROM pg_temp.cm_batch b
     WHERE NOT EXISTS (SELECT 1 FROM claimed c WHERE c.queue_id = b.queue_id);
    -- Row counts for the planner: the statements below join this batch to large tables.
    ANALYZE pg_temp.cm_batch;

    -- What UPDATE itself takes, in a fixed order: foreign-key inserts of transactions are not blocked.
    PERFORM 1
       FROM user_portfolios
      WHERE accountid = ANY (ARRAY(SELECT account_number FROM pg_temp.cm_batch WHERE status = 'COMPLETED'))
      ORDER BY accountid
        FOR NO KEY UPDATE;

    -- Each entry's uuid as a UUID: one plain cast when every uuid in the batch takes it, else entry by entry.
    BEGIN
        UPDATE pg_temp.cm_batch SET txn_id = uuid::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        UPDATE pg_temp.cm_batch SET txn_id = consistency.to_uuid(uuid);
    END;

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
               AND t.id = ANY (ARRAY(SELECT txn_id FROM pg_temp.cm_batch))) AS r
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

    -- Parked entries give their record back and wait for a retry.
    DELETE FROM consistency.applied_entries a
     USING pg_temp.cm_batch b
     WHERE b.reason IS NOT NULL
       AND a.queue = p_queue AND a.queue_id = b.queue_id;
    PERFORM consistency.park_batch(p_queue);

    -- Applied entries leave the parked list and give their outcome to their transactions.
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
         GROUP BY 1;
END
$$;
