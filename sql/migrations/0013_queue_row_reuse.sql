-- A queue row is the same entry only if its queue, its queue_id and its portfolio transaction are the same.
-- queue-db restored from a backup gives new rows the queue_ids of the rows the restore lost (its sequence comes
-- back at the dump's value); a uuid rewritten by hand, a replayed import or a failover to a replica restored
-- from a logical dump do the same. A row that now carries another transaction than the one applied under its
-- queue_id is a new entry: applied once if its transaction was never settled, parked as a duplicate if it was,
-- and never taken for a correction of the entry applied before. Each such reuse is kept, with a journal record.

-- The ledger holds each entry under its queue, queue_id and transaction, so a queue_id may come back with
-- another transaction. The transaction stays unique: money still moves once per transaction. A record from
-- before migration 3 that names no transaction stands for its queue row, whatever that row holds.
ALTER TABLE consistency.applied_entries DROP CONSTRAINT applied_entries_pkey;
CREATE INDEX applied_entries_entry ON consistency.applied_entries (queue, queue_id);

-- Queue rows found carrying another transaction than the one the ledger last recorded under their queue_id.
CREATE TABLE consistency.reused_entries (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue          TEXT NOT NULL,
    queue_id       INTEGER NOT NULL,
    earlier_txn_id UUID NOT NULL,  -- the transaction applied before under this queue_id
    uuid           TEXT,           -- the row's uuid as the queue spells it now
    txn_id         UUID,           -- that uuid as a portfolio transaction; NULL when it is not a UUID
    account_number TEXT,
    status         TEXT,
    cycle          BIGINT,
    noticed_at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE NULLS NOT DISTINCT (queue, queue_id, txn_id)
);

-- Records the batch's terminal entries as record_batch_v2 does, and marks the others unclaimed; an entry
-- counts as recorded only under the same queue_id and the same transaction. Entries whose queue_id the ledger
-- holds under another transaction are new entries: each reuse is kept in reused_entries, with a journal record,
-- once. Returns how many entries it marked unclaimed, and how many reuses it noticed.
CREATE FUNCTION consistency.record_batch_v3(
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
    -- One probe of the ledger per entry, as before: a drain's batch finds nothing, or the few entries read again.
    SELECT array_agg(a.queue_id), array_agg(a.txn_id), array_agg(a.applied_at)
      INTO known_ids, known_txns, known_at
      FROM consistency.applied_entries a
     WHERE a.queue = p_queue AND a.queue_id = ANY (ARRAY(SELECT queue_id FROM pg_temp.cm_batch));
    IF known_ids IS NOT NULL THEN
        UPDATE pg_temp.cm_batch b
           SET unclaimed = TRUE
          FROM unnest(known_ids, known_txns) AS k(queue_id, txn_id)
         WHERE k.queue_id = b.queue_id AND (k.txn_id = b.txn_id OR k.txn_id IS NULL);
        GET DIAGNOSTICS left_over = ROW_COUNT;
        -- The settled rows left whose queue_id the ledger holds: each under another transaction than theirs.
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

-- Sorts the entries the claim left as sort_unclaimed_v2 does, taking for a correction only an entry recorded
-- under the same transaction: an entry whose transaction another entry settled is parked with that reason, even
-- when its queue_id was applied before under another transaction. Returns the corrections noted.
CREATE FUNCTION consistency.sort_unclaimed_v3(p_queue TEXT, p_terminal TEXT[], p_open TEXT[], p_cycle BIGINT)
RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    corrected BIGINT;
BEGIN
    WITH seen AS (
        DELETE FROM pg_temp.cm_batch b
         USING consistency.applied_entries a
         WHERE b.unclaimed AND a.queue = p_queue AND a.queue_id = b.queue_id
           AND (a.txn_id = b.txn_id OR a.txn_id IS NULL)
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

-- Claims the batch's entries as claim_batch_v4 does, an entry being the same only under the same transaction:
-- recorded by record_batch_v3, sorted by sort_unclaimed_v3, and left out as resolved only while its row carries
-- the transaction it carried when it was resolved. Returns the corrections noted and the reuses noticed.
CREATE FUNCTION consistency.claim_batch_v5(
    p_queue TEXT, p_retrying BOOLEAN, p_terminal TEXT[], p_open TEXT[], p_cycle BIGINT,
    OUT corrected BIGINT, OUT reused BIGINT
)
LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
    target TEXT;
    analyzed REAL;
    loaded BIGINT;
BEGIN
    corrected := 0;
    PERFORM 1
       FROM consistency.parked_entries p
       JOIN pg_temp.cm_batch b ON b.queue_id = p.queue_id
      WHERE p.queue = p_queue
      ORDER BY p.queue_id
        FOR UPDATE OF p;
    -- A batch copied out of queue-db comes with its transaction ids (copy_into_batch in sql/queries.sql) unless
    -- one of its uuids is not a UUID.
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
      FROM consistency.record_batch_v3(p_queue, p_terminal, p_open, p_cycle) AS r;
    -- As claim_batch_v4: statistics gathered again only for a batch twice or half the size of theirs.
    SELECT reltuples INTO analyzed FROM pg_class WHERE oid = 'pg_temp.cm_batch'::regclass;
    SELECT count(*) INTO loaded FROM pg_temp.cm_batch;
    IF analyzed < 0 OR loaded > 2 * analyzed OR 2 * loaded < analyzed THEN
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

-- settle_batch_v3, taking back the ledger record only of the entry that cannot apply, under its transaction:
-- never the record of an entry applied before under the same queue_id. Pods of the previous release call it
-- too; for them a record of the same queue_id is always the entry's own, so nothing changes.
CREATE OR REPLACE FUNCTION consistency.settle_batch_v3(p_queue TEXT, p_terminal TEXT[], p_mirrored TEXT[], p_cycle BIGINT)
RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql AS $$
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
      JOIN pg_temp.cm_taken_transactions k ON k.id = b.txn_id
     WHERE b.reason IS NULL
       AND t.ctid = k.row_id AND t.id = k.id
       AND t.ctid = ANY (ARRAY(SELECT row_id FROM pg_temp.cm_taken_transactions));
    GET DIAGNOSTICS mirrored = ROW_COUNT;
    SELECT count(DISTINCT txn_id) INTO claimed FROM pg_temp.cm_batch WHERE reason IS NULL;
    IF mirrored <> claimed THEN
        RAISE EXCEPTION 'settle_batch_v3 mirrored % of the % portfolio transactions the batch settles', mirrored,
              claimed USING ERRCODE = 'data_exception';
    END IF;

    RETURN QUERY
        SELECT CASE WHEN b.reason IS NULL THEN b.status ELSE 'parked' END, count(*)
          FROM pg_temp.cm_batch b
         GROUP BY 1;
END
$$;
