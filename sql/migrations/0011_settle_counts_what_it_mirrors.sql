-- settle_batch_v3 mirrors the status of each transaction the batch settles where check_batch_v3 took it.
-- The batch's transaction holds those rows locked, so none can have moved; if one ever is not found there,
-- the batch is refused, as the database refuses any batch it cannot store (entry by entry then, each such
-- entry parked with this error shown), instead of settling without it.
CREATE OR REPLACE FUNCTION consistency.settle_batch_v3(p_queue TEXT, p_terminal TEXT[], p_mirrored TEXT[], p_cycle BIGINT)
RETURNS TABLE (outcome TEXT, entries BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    mirrored BIGINT;
    claimed BIGINT;
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
