-- Row locks: a portfolio or a portfolio transaction that another session holds locked delays only its own
-- account's entries. check_batch_v2 takes the rows it needs with SKIP LOCKED instead of waiting for them;
-- an entry whose row it could not take is parked, waiting for a row lock, and so is every later entry of
-- the same account, so that each account's entries still apply in their order. The parked retry of the
-- next cycles tries them again, and the ledger applies each once when the lock clears. The service calls
-- check_batch_v2 in place of check_batch_v1, which stays for pods of the previous release.

-- The parked entries that wait for a row lock, looked up by account for every batch while any wait.
CREATE INDEX parked_entries_waiting_for_lock ON consistency.parked_entries (queue, account_number)
 WHERE reason LIKE 'waiting for a row lock%';

-- Takes the portfolios the batch's completed entries compound and the transactions its entries settle,
-- skipping the rows another session holds, into pg_temp.cm_taken_portfolios and cm_taken_transactions (see
-- create_batch_table in sql/queries.sql); then gives each entry that cannot apply now its reason, checked
-- in this order, and parks the later entries of an account whose earlier entry waits for a lock.
CREATE FUNCTION consistency.check_batch_v2(p_queue TEXT, p_transaction_type TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    -- What an earlier batch of this transaction took is still held, and is taken again at no cost.
    DELETE FROM pg_temp.cm_taken_portfolios;
    DELETE FROM pg_temp.cm_taken_transactions;
    -- What UPDATE itself takes: foreign-key inserts of transactions are not blocked. SKIP LOCKED never
    -- waits, so the order in which the rows are taken cannot deadlock.
    INSERT INTO pg_temp.cm_taken_portfolios (accountid)
    SELECT accountid
      FROM user_portfolios
     WHERE accountid = ANY (ARRAY(SELECT account_number FROM pg_temp.cm_batch
                                   WHERE status = 'COMPLETED' AND reason IS NULL))
       FOR NO KEY UPDATE SKIP LOCKED;
    -- The transactions are looked up by index, however many rows their table holds, once: what the checks
    -- below read of them comes from the rows taken.
    INSERT INTO pg_temp.cm_taken_transactions (id, accountid, transaction_type)
    SELECT id, accountid, transaction_type
      FROM portfolio_transactions
     WHERE id = ANY (ARRAY(SELECT txn_id FROM pg_temp.cm_batch WHERE reason IS NULL))
       FOR NO KEY UPDATE SKIP LOCKED;

    -- Only blocked entries are written. A transaction not taken is either missing or held: the few not
    -- taken are told apart by a plain read, which a lock does not block.
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
                       -- Hashed: a NOT EXISTS here would be planned without the temp table's row count.
                       WHEN me.status = 'COMPLETED'
                            AND NOT (me.account_number IN (SELECT accountid FROM pg_temp.cm_taken_portfolios))
                           THEN 'waiting for a row lock on portfolio ' || me.account_number
                   END AS reason
              FROM pg_temp.cm_batch me
              LEFT JOIN pg_temp.cm_taken_transactions t ON t.id = me.txn_id
             WHERE me.reason IS NULL) AS r
     WHERE r.reason IS NOT NULL
       AND b.queue_id = r.queue_id;

    IF EXISTS (SELECT 1 FROM pg_temp.cm_batch WHERE reason LIKE 'waiting for a row lock%')
       OR EXISTS (SELECT 1 FROM consistency.parked_entries
                   WHERE queue = p_queue AND reason LIKE 'waiting for a row lock%') THEN
        PERFORM consistency.wait_behind_locks(p_queue);
    END IF;
END
$$;

-- Parks each entry of the batch that comes after an entry of its account waiting for a row lock, in this
-- batch or parked before it, with that reason.
CREATE FUNCTION consistency.wait_behind_locks(p_queue TEXT) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    WITH waiting AS (
        SELECT account_number, updated_at, queue_id
          FROM pg_temp.cm_batch
         WHERE reason LIKE 'waiting for a row lock%'
        UNION ALL
        SELECT p.account_number, p.updated_at, p.queue_id
          FROM consistency.parked_entries p
         WHERE p.queue = p_queue
           AND p.reason LIKE 'waiting for a row lock%'
           AND p.account_number IN (SELECT account_number FROM pg_temp.cm_batch)
           AND NOT EXISTS (SELECT 1 FROM pg_temp.cm_batch b WHERE b.queue_id = p.queue_id)
    ), first AS (
        SELECT DISTINCT ON (account_number) account_number, updated_at, queue_id
          FROM waiting
         ORDER BY account_number, updated_at, queue_id
    )
    UPDATE pg_temp.cm_batch b
       SET reason = 'waiting for a row lock: behind an earlier entry of account ' || f.account_number
      FROM first f
     WHERE b.account_number = f.account_number
       AND b.reason IS NULL
       AND (b.updated_at, b.queue_id) > (f.updated_at, f.queue_id);
END
$$;
