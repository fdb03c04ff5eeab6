-- Every statement the service runs, each under a name with a one-line description.
-- Values always go in as %(name)s parameters. {table} is filled only from a fixed list of queue
-- tables (domain.QUEUES), never from input.

-- ping: check that a database answers
SELECT 1;

-- listen_queue: ask queue-db for a notification when queue entries settle (schema/queue_notify.sql sends them)
LISTEN consistency_queue;

-- queue_horizon: whether other sessions' xact_start is visible, the oldest open one, how many sessions
-- hide their start (track_activities off), how many prepared transactions wait and since when, and the time
SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
           OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS exact,
       s.oldest_xact_start,
       s.untracked,
       p.prepared,
       p.oldest_prepared,
       clock_timestamp() AS now
  FROM (SELECT min(xact_start) AS oldest_xact_start, count(*) FILTER (WHERE state = 'disabled') AS untracked
          FROM pg_stat_activity
         WHERE datname = current_database()
           AND pid <> pg_backend_pid()
           AND backend_type = 'client backend') AS s,
       (SELECT count(*) AS prepared, min(prepared) AS oldest_prepared
          FROM pg_prepared_xacts
         WHERE database = current_database()) AS p;

-- queue_timestamp_types: the type of updated_at in each queue table, and queue-db's TimeZone
SELECT c.relname, format_type(a.atttypid, a.atttypmod), current_setting('TimeZone')
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
 WHERE a.attrelid = ANY (SELECT to_regclass(t) FROM unnest(%(tables)s::text[]) AS t)
   AND a.attname = 'updated_at'
   AND NOT a.attisdropped
 ORDER BY c.relname;

-- queue_read_settled_range: the next entries of a queue after one position and up to another that are not open (terminal, or an unknown status), in order, for the reconciliation sweep
SELECT q.queue_id, q.account_number, q.uuid, q.status, q.updated_at::timestamptz
  FROM {table} q
 WHERE (q.updated_at, q.queue_id) > (%(after_ts)s, %(after_id)s)
   AND (q.updated_at, q.queue_id) <= (%(until_ts)s, %(until_id)s)
   AND q.status IS DISTINCT FROM 'PENDING' AND q.status IS DISTINCT FROM 'PROCESSING'
 ORDER BY q.updated_at, q.queue_id
 LIMIT %(limit)s;

-- queue_copy_batch: the next entries of a queue after a position, as COPY text for pg_temp.cm_batch, the uuid twice: as written and as the transaction id (the cast reads a column without time zone in queue-db's TimeZone)
COPY (SELECT q.queue_id, q.account_number, q.uuid, q.uuid, q.status, q.updated_at::timestamptz
        FROM {table} q
       WHERE (q.updated_at, q.queue_id) > (%(after_ts)s, %(after_id)s)
       ORDER BY q.updated_at, q.queue_id
       LIMIT %(limit)s) TO STDOUT;

-- queue_backlog: the oldest entry of a queue after a position that is not open (settled, or an unknown status), among the first %(scan)s entries after it (none when they are all open), with its age by queue-db's clock: what waits, for /status
SELECT s.updated_at, s.queue_id, extract(epoch FROM clock_timestamp() - s.updated_at)::float8
  FROM (SELECT q.updated_at::timestamptz AS updated_at, q.queue_id, q.status
          FROM {table} q
         WHERE (q.updated_at, q.queue_id) > (%(after_ts)s, %(after_id)s)
         ORDER BY q.updated_at, q.queue_id
         LIMIT %(scan)s) AS s
 WHERE s.status IS DISTINCT FROM 'PENDING' AND s.status IS DISTINCT FROM 'PROCESSING'
 ORDER BY s.updated_at, s.queue_id
 LIMIT 1;

-- queue_read_range: the entries of a queue after one position and up to another, in order
SELECT q.queue_id, q.account_number, q.uuid, q.status, q.updated_at::timestamptz
  FROM {table} q
 WHERE (q.updated_at, q.queue_id) > (%(after_ts)s, %(after_id)s)
   AND (q.updated_at, q.queue_id) <= (%(last_ts)s, %(last_id)s)
 ORDER BY q.updated_at, q.queue_id;

-- queue_select_by_id: the current rows of a queue for a set of queue_ids
SELECT queue_id, account_number, uuid, status, updated_at::timestamptz
  FROM {table}
 WHERE queue_id = ANY(%(queue_ids)s::integer[]);

-- queue_has_watermark_index: whether a queue table has an index that starts with (updated_at, queue_id)
SELECT EXISTS (
    SELECT 1
      FROM pg_index i
     WHERE i.indrelid = to_regclass(%(table)s)
       AND (SELECT array_agg(a.attname::text ORDER BY k.n)
              FROM unnest(i.indkey[0:1]) WITH ORDINALITY AS k(attnum, n)
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
           = ARRAY['updated_at', 'queue_id']
) AS present;

-- migration_lock: serialise migrations across processes until the transaction ends
SELECT pg_advisory_xact_lock(%(key)s);

-- schema_exists: whether the service's own schema exists (an operator may create it beforehand)
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'consistency');

-- create_state_schema: the service's own schema
CREATE SCHEMA IF NOT EXISTS consistency;

-- create_migration_ledger: the table of applied migrations
CREATE TABLE IF NOT EXISTS consistency.schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- migration_ledger_exists: whether the migration ledger exists yet
SELECT to_regclass('consistency.schema_migrations') IS NOT NULL;

-- applied_migrations: the versions already applied
SELECT version FROM consistency.schema_migrations ORDER BY version;

-- record_migration: note that a migration has been applied
INSERT INTO consistency.schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- seed_tier_values: store the configured tier values the first time, with a history row each
WITH seeded AS (
    INSERT INTO consistency.tier_values (tier, pool, market)
    SELECT * FROM unnest(%(tiers)s::smallint[], %(pools)s::numeric[], %(markets)s::numeric[])
    ON CONFLICT (tier) DO NOTHING
    RETURNING tier, pool, market
)
INSERT INTO consistency.tier_value_history (tier, new_pool, new_market)
SELECT tier, pool, market FROM seeded;

-- select_tier_values: the stored tier values
SELECT tier, pool, market FROM consistency.tier_values ORDER BY tier;

-- select_tier_values_in_force: the stored tier values, each with the newest tier_value_history id, which names them
SELECT tier, pool, market, (SELECT coalesce(max(id), 0) FROM consistency.tier_value_history)
  FROM consistency.tier_values
 ORDER BY tier;

-- lock_tier_values: the stored tier values, locked for an update
SELECT tier, pool, market FROM consistency.tier_values ORDER BY tier FOR UPDATE;

-- update_tier_value: change one tier's values and keep the old ones in the history
WITH old AS (
    SELECT tier, pool, market FROM consistency.tier_values WHERE tier = %(tier)s
), changed AS (
    UPDATE consistency.tier_values t
       SET pool = %(pool)s, market = %(market)s, updated_at = CURRENT_TIMESTAMP
      FROM old
     WHERE t.tier = old.tier
    RETURNING t.tier, old.pool AS old_pool, t.pool, old.market AS old_market, t.market
)
INSERT INTO consistency.tier_value_history (tier, old_pool, new_pool, old_market, new_market)
SELECT tier, old_pool, pool, old_market, market FROM changed;

-- list_tier_history: the changes of the tier values, newest first, below an id when given: the tier, its pool and market values before (NULL for the seed) and after, and when
SELECT id, changed_at, tier, old_pool, new_pool, old_market, new_market
  FROM consistency.tier_value_history
 WHERE %(before)s::bigint IS NULL OR id < %(before)s::bigint
 ORDER BY id DESC
 LIMIT %(limit)s;

-- take_cycle_lease: take the cycle lease for a new epoch if it is free (given back, expired, or its holder's session gone) and no cycle started within fresh_for seconds; the epoch taken (or NULL), and who holds it and since how many seconds it was renewed (see sql/migrations/0008_cycle_lease.sql)
WITH free AS (
    SELECT id
      FROM consistency.cycle_lease l
     WHERE (holder IS NULL OR expires_at <= clock_timestamp()
            OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid))
       AND cycle_started_at <= clock_timestamp() - make_interval(secs => %(fresh_for)s)
       FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE consistency.cycle_lease l
       SET holder = %(holder)s,
           backend_pid = pg_backend_pid(),
           epoch = l.epoch + 1,
           renewed_at = clock_timestamp(),
           expires_at = clock_timestamp() + make_interval(secs => %(seconds)s),
           cycle_started_at = clock_timestamp()
      FROM free
     WHERE l.id = free.id
    RETURNING l.epoch
)
SELECT (SELECT epoch FROM taken), l.holder,
       CASE WHEN l.holder IS NOT NULL THEN extract(epoch FROM clock_timestamp() - l.renewed_at) END
  FROM consistency.cycle_lease l;

-- fence_cycle_lease: the first statement of every transaction of a cycle: renew the lease of this epoch, or fail
SELECT consistency.fence_cycle_lease(%(epoch)s, %(seconds)s);

-- give_cycle_lease: give the lease back at the end of the cycle; the time the cycle started stays
UPDATE consistency.cycle_lease
   SET holder = NULL, expires_at = clock_timestamp()
 WHERE epoch = %(epoch)s;

-- select_cycle_start: where each queue's cycle starts (its watermark and read position), whether it has parked entries to retry, whether its sweep is due, and the cycle's number (drawn once, the same on every row)
SELECT w.queue, w.updated_at, w.queue_id, w.read_updated_at, w.read_queue_id,
       EXISTS (SELECT 1 FROM consistency.parked_entries p WHERE p.queue = w.queue),
       w.swept_at <= clock_timestamp() - make_interval(secs => %(reconcile_interval)s),
       (SELECT nextval('consistency.cycles'))
  FROM consistency.watermarks w;

-- advance_watermark: move a queue's watermark forward, never back
UPDATE consistency.watermarks
   SET updated_at = %(ts)s, queue_id = %(id)s, moved_at = CURRENT_TIMESTAMP
 WHERE queue = %(queue)s
   AND (updated_at, queue_id) < (%(ts)s::timestamptz, %(id)s::integer);

-- advance_read_position: move a queue's read position (look-back mode) forward, never back (see sql/migrations/0009_read_positions.sql)
UPDATE consistency.watermarks
   SET read_updated_at = %(ts)s, read_queue_id = %(id)s
 WHERE queue = %(queue)s
   AND (read_updated_at IS NULL OR (read_updated_at, read_queue_id) < (%(ts)s::timestamptz, %(id)s::integer));

-- mark_swept: note that a queue's reconciliation sweep ended now, by this database's clock
UPDATE consistency.watermarks SET swept_at = clock_timestamp() WHERE queue = %(queue)s;

-- savepoint_batch: mark a point to return to if the database rejects a batch applied set-based
SAVEPOINT batch;

-- rollback_to_batch: undo the rejected batch, keeping what the transaction did before it
ROLLBACK TO SAVEPOINT batch;

-- release_batch: keep the batch's work
RELEASE SAVEPOINT batch;

-- savepoint_clean: mark a point to return to if the batch is not clean
SAVEPOINT clean;

-- rollback_to_clean: undo the clean try, so that the careful steps apply the batch
ROLLBACK TO SAVEPOINT clean;

-- release_clean: keep the clean try's work
RELEASE SAVEPOINT clean;

-- savepoint_entry: mark a point to return to if one entry is rejected
SAVEPOINT entry;

-- rollback_to_entry: undo the rejected entry only
ROLLBACK TO SAVEPOINT entry;

-- release_entry: keep the entry's work
RELEASE SAVEPOINT entry;

-- create_batch_table: the session's tables of entries to apply and of rows taken, emptied at every commit
CREATE TEMP TABLE IF NOT EXISTS cm_batch (
    queue_id       INTEGER NOT NULL,
    account_number TEXT,
    uuid           TEXT,
    status         TEXT,
    updated_at     TIMESTAMPTZ NOT NULL,
    txn_id         UUID,
    reason         TEXT,
    unclaimed      BOOLEAN NOT NULL DEFAULT FALSE
) ON COMMIT DELETE ROWS;
-- The rows of user-portfolio-db the batch's transaction holds locked (see sql/migrations/0007_row_locks.sql)
CREATE TEMP TABLE IF NOT EXISTS cm_taken_portfolios (
    accountid TEXT,
    row_id    TID  -- where the row lies: check_batch_v4 and check_clean_batch_v2 keep it, compound_batch_v4 uses it
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS cm_taken_transactions (
    row_id           TID,  -- where the row lies: check_batch_v3 and v4 keep it, settle_batch_v3 and v4 update by it
    id               UUID,
    accountid        TEXT,
    transaction_type TEXT
) ON COMMIT DELETE ROWS;

-- copy_into_batch: load COPY text from queue_copy_batch into the batch table, which reads each transaction id as a UUID
COPY pg_temp.cm_batch (queue_id, account_number, uuid, txn_id, status, updated_at) FROM STDIN;

-- copy_into_batch_as_written: load COPY text from queue_copy_batch, less its transaction ids, into the batch table (the claim works them out)
COPY pg_temp.cm_batch (queue_id, account_number, uuid, status, updated_at) FROM STDIN;

-- savepoint_load: mark a point to return to if the batch's transaction ids are not all UUIDs
SAVEPOINT load;

-- rollback_to_load: undo the load that read a uuid which is not a UUID
ROLLBACK TO SAVEPOINT load;

-- release_load: keep the load
RELEASE SAVEPOINT load;

-- clear_batch_table: empty the batch table before loading entries into it within a transaction
DELETE FROM pg_temp.cm_batch;

-- load_batch_entries: load entries, and the reasons of those to park, into the batch table from arrays
INSERT INTO pg_temp.cm_batch (queue_id, account_number, uuid, status, updated_at, reason)
SELECT * FROM unnest(%(queue_ids)s::integer[], %(accounts)s::text[], %(uuids)s::text[],
                     %(statuses)s::text[], %(updated)s::timestamptz[], %(reasons)s::text[]);

-- park_batch: park the batch table's entries that have a reason, with a journal record for each new parking or reason (see sql/migrations/0005_operators.sql)
SELECT consistency.park_batch_v2(%(queue)s, %(cycle)s);

-- batch_extent: how many entries the batch table holds, and the last one's position
SELECT count(*) OVER (), updated_at, queue_id
  FROM pg_temp.cm_batch
 ORDER BY updated_at DESC, queue_id DESC
 LIMIT 1;

-- claim_batch: step 1 of applying the batch table's entries, which leaves out the resolved ones and records the others once each, an entry being its queue, queue_id and transaction; the corrections it noted and the queue rows it found reused (see sql/migrations/0005_operators.sql, 0012_clean_batches.sql, 0013_queue_row_reuse.sql and 0017_plans_without_luck.sql)
SELECT corrected, reused
  FROM consistency.claim_batch_v6(%(queue)s, %(retrying)s, %(terminal)s::text[], %(open)s::text[], %(cycle)s);

-- check_batch: step 2, which takes the rows the claimed entries need, skipping those another session holds, and gives each entry that cannot apply now its reason (see sql/migrations/0007_row_locks.sql, 0010_batch_sized_steps.sql and 0017_plans_without_luck.sql)
SELECT consistency.check_batch_v4(%(queue)s, %(transaction_type)s);

-- compound_batch: step 3, which compounds the completed entries on the portfolios step 2 took and writes their journal records (see sql/migrations/0010_batch_sized_steps.sql, 0012_clean_batches.sql and 0017_plans_without_luck.sql)
SELECT consistency.compound_batch_v4(%(queue)s, %(retrying)s, %(columns)s, %(numerators)s::numeric[],
                                     %(denominators)s::numeric[], %(tier_version)s, %(cycle)s);

-- settle_batch: step 4, which parks the blocked entries, mirrors the others' statuses, writes the journal records of those that did not complete, and counts the outcomes (see sql/migrations/0010_batch_sized_steps.sql, 0011_settle_counts_what_it_mirrors.sql and 0017_plans_without_luck.sql)
SELECT outcome, entries
  FROM consistency.settle_batch_v4(%(queue)s, %(terminal)s::text[], %(mirrored)s::text[], %(cycle)s);

-- check_clean_batch: step 2 the clean way, which takes the portfolios the completed entries compound and refuses (SQLSTATE CMB01) a batch not clean so far (see sql/migrations/0012_clean_batches.sql and 0017_plans_without_luck.sql)
SELECT consistency.check_clean_batch_v2(%(queue)s);

-- settle_clean_batch: step 4 the clean way, which mirrors the statuses, writes the journal records of the entries that did not complete and counts the outcomes, or refuses a batch not clean (see sql/migrations/0012_clean_batches.sql)
SELECT outcome, entries
  FROM consistency.settle_clean_batch_v1(%(queue)s, %(transaction_type)s, %(terminal)s::text[], %(mirrored)s::text[],
                                         %(cycle)s);

-- probe_by_index: for the rest of this transaction, join by probing indexes row by row: after a big drain the ledger's statistics are stale until autovacuum analyses it, and filter_unapplied would then hash the whole ledger for every page of the sweep (0.45 s a page at 1,000,000 entries, not 0.05 s)
SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true);

-- filter_unapplied: of the given entries, those neither applied (under the transaction they carry), parked nor resolved (while carrying the transaction they were resolved with)
SELECT e.queue_id
  FROM unnest(%(queue_ids)s::integer[], %(uuids)s::text[]) AS e(queue_id, uuid)
 WHERE NOT EXISTS (SELECT 1 FROM consistency.applied_entries a
                    WHERE a.queue = %(queue)s AND a.queue_id = e.queue_id
                      AND (a.txn_id IS NULL OR a.txn_id = consistency.to_uuid(e.uuid)))
   AND NOT EXISTS (SELECT 1 FROM consistency.parked_entries p
                    WHERE p.queue = %(queue)s AND p.queue_id = e.queue_id)
   AND NOT EXISTS (SELECT 1 FROM consistency.resolved_entries r
                    WHERE r.queue = %(queue)s AND r.queue_id = e.queue_id
                      AND (r.uuid IS NOT DISTINCT FROM e.uuid OR consistency.to_uuid(r.uuid) = consistency.to_uuid(e.uuid)));

-- release_reopened: release parked entries whose queue rows are open again, with a journal record each; the cycle reads them again when they settle
WITH released AS (
    DELETE FROM consistency.parked_entries
     WHERE queue = %(queue)s AND queue_id = ANY(%(queue_ids)s::integer[])
    RETURNING queue_id, account_number, status, attempts
)
INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, reason, attempts, cycle)
SELECT %(queue)s, queue_id, account_number, 'released', status, 'the queue entry is open again', attempts, %(cycle)s
  FROM released
 ORDER BY queue_id;

-- select_parked_batch: the next parked entries of a queue after a position, for a retry
SELECT queue_id, account_number, uuid, status, updated_at
  FROM consistency.parked_entries
 WHERE queue = %(queue)s
   AND (updated_at, queue_id) > (%(after_ts)s, %(after_id)s)
 ORDER BY updated_at, queue_id
 LIMIT %(limit)s;

-- page_plan: in this transaction, read each page along its index in key order whatever the statistics say (a table loaded since its last ANALYZE looks small, and a sort of every row of the range would look cheaper), by ruling sorts out
SET LOCAL enable_sort = off;

-- list_parked_page: the parked entries a filter matches (a NULL field matches every entry; the reason as a substring, case-sensitive) after a position, oldest first by (parked_at, queue, queue_id); each of the given queues is read along an index from the position on, at most %(scan)s entries (see sql/migrations/0014_operator_reads.sql), and the first row names where the reading stopped short (NULLs when every queue was read to its end), with no entry after that place
WITH read AS MATERIALIZED (
    SELECT p.*
      FROM unnest(%(queues)s::text[]) AS q(queue)
     CROSS JOIN LATERAL (
           SELECT e.queue, e.queue_id, e.uuid, e.account_number, e.status, e.reason, e.attempts, e.parked_at,
                  e.last_attempt_at, row_number() OVER (ORDER BY e.parked_at, e.queue_id) AS n
             FROM (SELECT *
                     FROM consistency.parked_entries e
                    WHERE e.queue = q.queue
                      AND (%(account)s::text IS NULL OR e.account_number = %(account)s::text)
                      -- Within one queue, (parked_at, queue_id) after the position: all of the position's
                      -- parked_at in a queue that sorts after the position's, none in one that sorts before.
                      AND (%(after_at)s::timestamptz IS NULL
                           OR (e.parked_at, e.queue_id) > (%(after_at)s::timestamptz,
                               CASE WHEN q.queue > %(after_queue)s::text THEN -1
                                    WHEN q.queue = %(after_queue)s::text THEN %(after_id)s::integer
                                    ELSE 2147483647 END))
                    ORDER BY e.parked_at, e.queue_id
                    LIMIT %(scan)s) AS e) AS p
), stop AS (
    SELECT parked_at, queue, queue_id
      FROM read
     WHERE n = %(scan)s
     ORDER BY parked_at, queue, queue_id
     LIMIT 1
)
SELECT s.parked_at, s.queue, s.queue_id, m.*
  FROM (SELECT) AS one
  LEFT JOIN stop s ON TRUE
  LEFT JOIN LATERAL (SELECT r.queue, r.queue_id, r.uuid, r.account_number, r.status, r.reason, r.attempts,
                            r.parked_at, r.last_attempt_at
                       FROM read r
                      WHERE (s.queue IS NULL OR (r.parked_at, r.queue, r.queue_id) <= (s.parked_at, s.queue, s.queue_id))
                        AND (%(reason)s::text IS NULL OR strpos(r.reason, %(reason)s::text) > 0)
                      ORDER BY r.parked_at, r.queue, r.queue_id
                      LIMIT %(limit)s) AS m ON TRUE
 ORDER BY m.parked_at, m.queue, m.queue_id;

-- count_corrections: how many applied entries the queue has changed since
SELECT count(*) FROM consistency.corrections;

-- list_corrections: applied entries the queue has changed since, for the API, newest first
SELECT queue, uuid, queue_id, applied_status, queue_status, first_seen_at, noticed_at
  FROM consistency.corrections
 ORDER BY noticed_at DESC, queue, queue_id
 LIMIT %(limit)s;

-- select_new_corrections: the corrections of a queue that this transaction found or changed, of the given entries (any, when NULL)
SELECT queue_id, uuid, applied_status, queue_status
  FROM consistency.corrections
 WHERE queue = %(queue)s AND noticed_at = CURRENT_TIMESTAMP
   AND (%(queue_ids)s::integer[] IS NULL OR queue_id = ANY(%(queue_ids)s::integer[]))
 ORDER BY queue_id;

-- count_reused_entries: how many queue rows were found carrying another transaction than the one applied under their queue_id
SELECT count(*) FROM consistency.reused_entries;

-- list_reused_entries: queue rows found carrying another transaction than the one applied under their queue_id, newest first, below an id when given, each with where the new entry stands (applied, parked with its reason, resolved, or not applied yet)
SELECT r.id, r.noticed_at, r.queue, r.queue_id, r.earlier_txn_id AS earlier_transaction,
       r.txn_id AS portfolio_transaction, r.uuid, r.account_number, r.status, r.cycle,
       CASE WHEN a.applied THEN 'applied' WHEN p.reason IS NOT NULL THEN 'parked'
            WHEN s.resolved THEN 'resolved' ELSE 'not applied yet' END AS state,
       p.reason AS parked_reason
  FROM consistency.reused_entries r
  LEFT JOIN LATERAL (SELECT TRUE AS applied FROM consistency.applied_entries a
                      WHERE a.queue = r.queue AND a.queue_id = r.queue_id AND a.txn_id = r.txn_id) AS a ON TRUE
  LEFT JOIN LATERAL (SELECT p.reason FROM consistency.parked_entries p
                      WHERE p.queue = r.queue AND p.queue_id = r.queue_id
                        AND (p.uuid IS NOT DISTINCT FROM r.uuid OR consistency.to_uuid(p.uuid) = r.txn_id)) AS p ON TRUE
  LEFT JOIN LATERAL (SELECT TRUE AS resolved FROM consistency.resolved_entries s
                      WHERE s.queue = r.queue AND s.queue_id = r.queue_id
                        AND (s.uuid IS NOT DISTINCT FROM r.uuid OR consistency.to_uuid(s.uuid) = r.txn_id)) AS s ON TRUE
 WHERE %(before)s::bigint IS NULL OR r.id < %(before)s::bigint
 ORDER BY r.id DESC
 LIMIT %(limit)s;

-- select_new_reuses: the queue rows of a queue found reused by this transaction, of the given entries (any, when NULL)
SELECT queue_id, earlier_txn_id, coalesce(txn_id::text, uuid), status
  FROM consistency.reused_entries
 WHERE queue = %(queue)s AND noticed_at = CURRENT_TIMESTAMP
   AND (%(queue_ids)s::integer[] IS NULL OR queue_id = ANY(%(queue_ids)s::integer[]))
 ORDER BY queue_id;

-- save_last_cycle: keep the summary of the cycle that just finished, as the last one and among the 100 newest
WITH last AS (
    INSERT INTO consistency.last_cycle (id, summary) VALUES (TRUE, %(summary)s)
        ON CONFLICT (id) DO UPDATE SET summary = EXCLUDED.summary
), recent AS (
    INSERT INTO consistency.recent_cycles (cycle, summary) VALUES (%(cycle)s, %(summary)s)
        ON CONFLICT (cycle) DO UPDATE SET summary = EXCLUDED.summary
)
DELETE FROM consistency.recent_cycles WHERE cycle <= %(cycle)s - 100;

-- recent_cycles: the summaries of the newest cycles that ran, newest first
SELECT summary FROM consistency.recent_cycles ORDER BY cycle DESC LIMIT %(limit)s;

-- note_applied: add a batch's applied entries to this minute's count of its queue, and forget minutes a day old
WITH added AS (
    INSERT INTO consistency.applied_per_minute AS a (minute, queue, entries)
    VALUES (date_trunc('minute', CURRENT_TIMESTAMP), %(queue)s, %(entries)s)
        ON CONFLICT (minute, queue) DO UPDATE SET entries = a.entries + EXCLUDED.entries
)
DELETE FROM consistency.applied_per_minute WHERE minute < date_trunc('minute', CURRENT_TIMESTAMP) - interval '1 day';

-- applied_per_minute: the entries applied per minute and queue since a time, oldest first
SELECT minute, queue, entries
  FROM consistency.applied_per_minute
 WHERE minute >= %(since)s
 ORDER BY minute, queue;

-- The console's sessions ------------------------------------------------------------------------------------

-- open_console_session: keep a new signed-in session, and delete those idle longer than the expiry
WITH expired AS (
    DELETE FROM consistency.console_sessions
     WHERE last_seen_at < clock_timestamp() - make_interval(secs => %(idle)s)
)
INSERT INTO consistency.console_sessions (id_digest, name, token_digest, csrf)
VALUES (%(id_digest)s, %(name)s, %(token_digest)s, %(csrf)s);

-- find_console_session: a session, by the digest of its id, with the seconds since it was last seen
SELECT name, token_digest, csrf, extract(epoch FROM clock_timestamp() - last_seen_at)::float8
  FROM consistency.console_sessions
 WHERE id_digest = %(id_digest)s;

-- touch_console_session: note that a session was seen now
UPDATE consistency.console_sessions SET last_seen_at = clock_timestamp() WHERE id_digest = %(id_digest)s;

-- close_console_session: end a session
DELETE FROM consistency.console_sessions WHERE id_digest = %(id_digest)s;

-- select_last_cycle: the summary of the last finished cycle
SELECT summary FROM consistency.last_cycle;

-- The audit trail -----------------------------------------------------------------------------------------

-- insert_audit: record an operator's action: who, what, what it touched and why
INSERT INTO consistency.audit_log (actor, action, target, reason, detail)
VALUES (%(actor)s, %(action)s, %(target)s, %(reason)s, %(detail)s)
RETURNING id, at;

-- list_audit_matching: operator actions of an action and of an actor (a NULL filter matches every one), newest first, below an id when given; each filter walks its index, by the statement's constants (see sql/migrations/0015_audit_filters.sql)
SELECT id, at, actor, action, target, reason, detail
  FROM consistency.audit_log
 WHERE (%(action)s::text IS NULL OR action = %(action)s::text)
   AND (%(actor)s::text IS NULL OR actor = %(actor)s::text)
   AND (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
 ORDER BY id DESC
 LIMIT %(limit)s;

-- The journal ---------------------------------------------------------------------------------------------

-- list_account_journal: one account's journal records, newest first, below an id when given (only those of the given ids, when given), with the portfolio transaction each record is about: the one its queue row carried then, by the reuses found of that row (each noticed in the transaction of the new entry's records), else the one the ledger recorded for it
SELECT j.id, j.at, j.queue, j.queue_id,
       CASE WHEN u.found THEN u.txn_id ELSE a.txn_id END AS portfolio_transaction, j.kind, j.status, j.reason, j.attempts,
       CASE WHEN j.tier1_after IS NOT NULL THEN ARRAY[j.tier1_before, j.tier2_before, j.tier3_before] END AS before,
       CASE WHEN j.tier1_after IS NOT NULL THEN ARRAY[j.tier1_after, j.tier2_after, j.tier3_after] END AS after,
       j.tier_version, j.cycle, j.actor
  FROM consistency.journal j
  LEFT JOIN LATERAL (SELECT TRUE AS found,
                            CASE WHEN r.noticed_at <= j.at THEN r.txn_id ELSE r.earlier_txn_id END AS txn_id
                       FROM consistency.reused_entries r
                      WHERE r.queue = j.queue AND r.queue_id = j.queue_id
                      ORDER BY r.noticed_at <= j.at DESC, abs(extract(epoch FROM r.noticed_at - j.at)), r.id
                      LIMIT 1) AS u ON TRUE
  LEFT JOIN LATERAL (SELECT txn_id FROM consistency.applied_entries
                      WHERE queue = j.queue AND queue_id = j.queue_id
                      ORDER BY applied_at DESC
                      LIMIT 1) AS a ON TRUE
 WHERE j.account_number = %(account)s
   AND (%(before)s::bigint IS NULL OR j.id < %(before)s::bigint)
   AND (%(ids)s::bigint[] IS NULL OR j.id = ANY(%(ids)s::bigint[]))
 ORDER BY j.id DESC
 LIMIT %(limit)s;

-- entry_journal: one entry's journal records, oldest first (at most a limit), found among the records of the accounts it named
SELECT id, at, kind, account_number, status, reason, attempts,
       CASE WHEN tier1_after IS NOT NULL THEN ARRAY[tier1_before, tier2_before, tier3_before] END AS before,
       CASE WHEN tier1_after IS NOT NULL THEN ARRAY[tier1_after, tier2_after, tier3_after] END AS after,
       tier_version, cycle, actor
  FROM consistency.journal
 WHERE (account_number = ANY(%(accounts)s::text[]) OR (%(no_account)s AND account_number IS NULL))
   AND queue = %(queue)s AND queue_id = %(queue_id)s
 ORDER BY id
 LIMIT %(limit)s;

-- entry_standing: where one queue row stands now: its ledger records (one per transaction applied under its queue_id, oldest first), its parking, its resolution, its correction and the reuses found of it, each as JSON or NULL
SELECT (SELECT jsonb_agg(jsonb_build_object('status', a.status, 'portfolio_transaction', a.txn_id, 'uuid', a.uuid,
                                            'applied_at', a.applied_at, 'account_number', t.accountid)
                         ORDER BY a.applied_at)
          FROM consistency.applied_entries a
          LEFT JOIN portfolio_transactions t ON t.id = a.txn_id
         WHERE a.queue = %(queue)s AND a.queue_id = %(queue_id)s),
       (SELECT jsonb_build_object('reason', reason, 'attempts', attempts, 'status', status, 'uuid', uuid,
                                  'parked_at', parked_at, 'last_attempt_at', last_attempt_at,
                                  'account_number', account_number)
          FROM consistency.parked_entries WHERE queue = %(queue)s AND queue_id = %(queue_id)s),
       (SELECT jsonb_build_object('reason', reason, 'resolved_by', resolved_by, 'resolved_at', resolved_at,
                                  'status', status, 'uuid', uuid, 'account_number', account_number)
          FROM consistency.resolved_entries WHERE queue = %(queue)s AND queue_id = %(queue_id)s),
       (SELECT jsonb_build_object('applied_status', applied_status, 'queue_status', queue_status,
                                  'first_seen_at', first_seen_at, 'noticed_at', noticed_at)
          FROM consistency.corrections WHERE queue = %(queue)s AND queue_id = %(queue_id)s),
       (SELECT jsonb_agg(jsonb_build_object('earlier_transaction', earlier_txn_id, 'portfolio_transaction', txn_id,
                                            'uuid', uuid, 'status', status, 'account_number', account_number,
                                            'noticed_at', noticed_at)
                         ORDER BY noticed_at, id)
          FROM consistency.reused_entries WHERE queue = %(queue)s AND queue_id = %(queue_id)s);

-- tier_values_at_versions: the tier values in force as of each of the given tier_value_history ids: each tier's newest row up to it, one probe of tier_value_history_tier each (see sql/migrations/0014_operator_reads.sql)
SELECT v.version, t.tier, h.new_pool, h.new_market
  FROM unnest(%(versions)s::bigint[]) AS v(version)
 CROSS JOIN generate_series(1, 3) AS t(tier)
 CROSS JOIN LATERAL (SELECT new_pool, new_market
                       FROM consistency.tier_value_history
                      WHERE tier = t.tier AND id <= v.version
                      ORDER BY id DESC
                      LIMIT 1) AS h
 ORDER BY v.version, t.tier;

-- read_snapshot: the first statement of a read made of several statements: all of them see one snapshot, so that a cycle committing meanwhile cannot set one against another
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- portfolio_standing: one account's portfolio amounts now (NULLs when it has none) and, of its newest journal records (at most %(scan)s, along journal_account), how many were read and the newest completed record of each queue: the one whose amounts after it the portfolio should still show
SELECT p.tier1_value, p.tier2_value, p.tier3_value, p.total_value,
       p.tier1_allocation, p.tier2_allocation, p.tier3_allocation, p.total_allocation, p.updated_at,
       j.records_read, j.last_investment, j.last_withdrawal
  FROM (SELECT count(*) AS records_read,
               max(id) FILTER (WHERE queue = %(investment)s AND tier1_after IS NOT NULL) AS last_investment,
               max(id) FILTER (WHERE queue = %(withdrawal)s AND tier1_after IS NOT NULL) AS last_withdrawal
          FROM (SELECT id, queue, tier1_after
                  FROM consistency.journal
                 WHERE account_number = %(account)s
                 ORDER BY id DESC
                 LIMIT %(scan)s) AS recent) AS j
  LEFT JOIN user_portfolios p ON p.accountid = %(account)s;

-- insert_journal_record: write one record against an entry, such as an operator's action on it
INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, reason, attempts, actor, cycle)
VALUES (%(queue)s, %(queue_id)s, %(account)s, %(kind)s, %(status)s, %(reason)s, %(attempts)s, %(actor)s, %(cycle)s);

-- Operator actions on entries -----------------------------------------------------------------------------

-- lock_parked_entries: the given parked entries, locked in key order until the action on them commits
SELECT p.queue, p.queue_id, p.uuid, p.account_number, p.status, p.reason, p.attempts, p.parked_at, p.last_attempt_at
  FROM consistency.parked_entries p
  JOIN unnest(%(queues)s::text[], %(queue_ids)s::integer[]) AS e(queue, queue_id)
    ON p.queue = e.queue AND p.queue_id = e.queue_id
 ORDER BY p.queue, p.queue_id
   FOR UPDATE OF p;

-- select_parked_matching: the parked entries a bulk action's filter matches (a NULL field matches every entry), in key order
SELECT queue, queue_id, uuid, account_number, status, reason, attempts, parked_at, last_attempt_at
  FROM consistency.parked_entries
 WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
   AND (%(account)s::text IS NULL OR account_number = %(account)s::text)
   AND (%(parked_reason)s::text IS NULL OR strpos(reason, %(parked_reason)s::text) > 0)
 ORDER BY queue, queue_id
 LIMIT %(limit)s;

-- lock_parked_matching: the same entries as select_parked_matching, locked in key order until the bulk action commits
SELECT queue, queue_id, uuid, account_number, status, reason, attempts, parked_at, last_attempt_at
  FROM consistency.parked_entries
 WHERE (%(queue)s::text IS NULL OR queue = %(queue)s::text)
   AND (%(account)s::text IS NULL OR account_number = %(account)s::text)
   AND (%(parked_reason)s::text IS NULL OR strpos(reason, %(parked_reason)s::text) > 0)
 ORDER BY queue, queue_id
 LIMIT %(limit)s
   FOR UPDATE;

-- select_ledger_records: which of the given entries have a ledger record under the transaction they carry (were applied)
SELECT a.queue, a.queue_id
  FROM consistency.applied_entries a
  JOIN unnest(%(queues)s::text[], %(queue_ids)s::integer[], %(uuids)s::text[]) AS e(queue, queue_id, uuid)
    ON a.queue = e.queue AND a.queue_id = e.queue_id
   AND (a.txn_id IS NULL OR a.txn_id = consistency.to_uuid(e.uuid))
 ORDER BY a.queue, a.queue_id;

-- resolve_parked_entries: move the given parked entries to the resolved ones, by whom and why; they leave the parked list
WITH taken AS (
    DELETE FROM consistency.parked_entries p
     USING unnest(%(queues)s::text[], %(queue_ids)s::integer[]) AS e(queue, queue_id)
     WHERE p.queue = e.queue AND p.queue_id = e.queue_id
    RETURNING p.queue, p.queue_id, p.uuid, p.account_number, p.status
)
INSERT INTO consistency.resolved_entries (queue, queue_id, uuid, account_number, status, reason, resolved_by)
SELECT queue, queue_id, uuid, account_number, status, %(reason)s, %(actor)s FROM taken
    ON CONFLICT (queue, queue_id) DO NOTHING
RETURNING queue, queue_id, resolved_at;

-- select_entry_states: where each of the given entries stands: its latest ledger record, its resolution, its parking
SELECT e.queue, e.queue_id, a.status, a.applied_at, r.resolved_by, r.resolved_at, p.reason, p.attempts
  FROM unnest(%(queues)s::text[], %(queue_ids)s::integer[]) AS e(queue, queue_id)
  LEFT JOIN LATERAL (SELECT status, applied_at FROM consistency.applied_entries
                      WHERE queue = e.queue AND queue_id = e.queue_id
                      ORDER BY applied_at DESC
                      LIMIT 1) AS a ON TRUE
  LEFT JOIN consistency.resolved_entries r ON r.queue = e.queue AND r.queue_id = e.queue_id
  LEFT JOIN consistency.parked_entries p ON p.queue = e.queue AND p.queue_id = e.queue_id
 ORDER BY e.queue, e.queue_id;

-- The pause -----------------------------------------------------------------------------------------------

-- select_pause: the pause in force, if applying is paused
SELECT paused_by, reason, paused_at FROM consistency.pause;

-- insert_pause: pause applying unless it is paused already; returns the pause stored, or nothing
INSERT INTO consistency.pause (paused_by, reason) VALUES (%(actor)s, %(reason)s)
    ON CONFLICT (id) DO NOTHING
RETURNING paused_by, reason, paused_at;

-- delete_pause: end the pause in force, if any; returns it
DELETE FROM consistency.pause RETURNING paused_by, reason, paused_at;

-- select_counts_pause_and_lease: how many entries are parked, how many applied ones the queue has changed since, how many queue rows were found reused, the pause in force (NULLs when none), and the cycle lease: its holder (NULL when given back or when its holder's session is gone: free at once), epoch, and seconds since it was renewed and until it expires (below 0: expired), by this database's clock
SELECT (SELECT count(*) FROM consistency.parked_entries),
       (SELECT count(*) FROM consistency.corrections),
       (SELECT count(*) FROM consistency.reused_entries),
       p.paused_by, p.reason, p.paused_at,
       h.holder, coalesce(l.epoch, 0), h.renewed_s, h.expires_in_s
  FROM (SELECT) AS one
  LEFT JOIN consistency.cycle_lease l ON TRUE
  LEFT JOIN LATERAL (SELECT l.holder,
                            extract(epoch FROM clock_timestamp() - l.renewed_at)::float8 AS renewed_s,
                            extract(epoch FROM l.expires_at - clock_timestamp())::float8 AS expires_in_s
                      WHERE l.holder IS NOT NULL
                        AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid)) AS h ON TRUE
  LEFT JOIN consistency.pause p ON TRUE;

-- Drift checks --------------------------------------------------------------------------------------------

-- drift_try_lock: take the drift check turn for this session if no other session holds it; held until unlocked or disconnected
SELECT pg_try_advisory_lock(%(key)s);

-- drift_unlock: give the drift check turn back
SELECT pg_advisory_unlock(%(key)s);

-- drift_poll: the newest check, whether DRIFT_CHECK_INTERVAL has passed since it started, and whether a session holds the drift lock
SELECT c.id, c.state,
       c.started_at <= CURRENT_TIMESTAMP - make_interval(secs => %(interval)s) AS due,
       EXISTS (SELECT 1 FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.granted
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = %(key_high)s::oid AND l.objid = %(key_low)s::oid AND l.objsubid = 1) AS locked
  FROM (SELECT 1) AS one
  LEFT JOIN LATERAL (SELECT id, state, started_at FROM consistency.drift_checks ORDER BY id DESC LIMIT 1) AS c ON TRUE;

-- drift_last_done: the findings by kind of the last check that finished, and when it finished
SELECT counts, finished_at FROM consistency.drift_checks WHERE state = 'done' ORDER BY id DESC LIMIT 1;

-- drift_running: the check that is running, if any, with where it stands
SELECT id, started_by, started_at, positions, rows_read, counts FROM consistency.drift_checks WHERE state = 'running';

-- drift_insert_check: store a new check, running, with no findings yet
INSERT INTO consistency.drift_checks (started_by, reason, counts)
VALUES (%(started_by)s, %(reason)s, %(counts)s)
RETURNING id, started_by, state, started_at;

-- drift_save_progress: after a chunk, store where each phase goes on, the rows read and the findings counted so far
UPDATE consistency.drift_checks
   SET positions = %(positions)s, rows_read = %(rows_read)s, counts = %(counts)s
 WHERE id = %(id)s AND state = 'running';

-- drift_finish: end a running check as done or failed
UPDATE consistency.drift_checks
   SET state = %(state)s, finished_at = CURRENT_TIMESTAMP, error = %(error)s
 WHERE id = %(id)s AND state = 'running'
RETURNING finished_at;

-- drift_insert_findings: keep findings of a check, one per array element
INSERT INTO consistency.drift_findings (check_id, kind, queue, queue_id, uuid, txn_id, account_number, detail)
SELECT %(check_id)s, f.kind, f.queue, f.queue_id, f.uuid, f.txn_id, f.account_number, f.detail::jsonb
  FROM unnest(%(kinds)s::text[], %(queues)s::text[], %(queue_ids)s::integer[], %(uuids)s::text[],
              %(txn_ids)s::uuid[], %(accounts)s::text[], %(details)s::text[])
       AS f(kind, queue, queue_id, uuid, txn_id, account_number, detail);

-- drift_check: one check for its report: the one with the given id, or the newest when the id is NULL
SELECT id, started_by, reason, state, started_at, finished_at, rows_read, counts, positions, error
  FROM consistency.drift_checks
 WHERE id = coalesce(%(id)s::bigint, (SELECT max(id) FROM consistency.drift_checks));

-- list_drift_checks: every check, newest first, below an id when given, with its counts by kind (not its findings)
SELECT id, started_by, reason, state, started_at, finished_at, rows_read, error, counts
  FROM consistency.drift_checks
 WHERE %(before)s::bigint IS NULL OR id < %(before)s::bigint
 ORDER BY id DESC
 LIMIT %(limit)s;

-- drift_findings_of: the findings kept of a check, in the order they were found
SELECT kind, queue, queue_id, uuid, txn_id, account_number, detail
  FROM consistency.drift_findings
 WHERE check_id = %(check_id)s
 ORDER BY id;

-- drift_keyset_plan: in this transaction, read each chunk along its index in key order whatever the statistics say (a table loaded since its last ANALYZE looks small, and a sort of every row after the key would look cheaper), by ruling sorts out
SET LOCAL enable_sort = off;

-- drift_queue_chunk: a chunk of a queue's entries in queue_id order, from a queue_id on (one row more than the chunk, to tell where the next starts)
SELECT queue_id, account_number, uuid, status, updated_at::timestamptz
  FROM {table}
 WHERE queue_id >= %(next)s
 ORDER BY queue_id
 LIMIT %(limit)s;

-- drift_unapplied: of a chunk's settled entries, those at or behind the watermark and not before the baseline that have no ledger record under the transaction they carry and are neither parked nor resolved (one index probe of each per entry)
SELECT e.queue_id
  FROM unnest(%(queue_ids)s::integer[], %(updated)s::timestamptz[], %(uuids)s::text[]) AS e(queue_id, updated_at, uuid)
  JOIN consistency.watermarks w ON w.queue = %(queue)s
  LEFT JOIN consistency.baseline b ON b.queue = %(queue)s
  LEFT JOIN LATERAL (
        SELECT 1 AS known FROM consistency.applied_entries a
         WHERE a.queue = %(queue)s AND a.queue_id = e.queue_id
           AND (a.txn_id IS NULL OR a.txn_id = consistency.to_uuid(e.uuid))
        UNION ALL
        SELECT 1 FROM consistency.parked_entries p WHERE p.queue = %(queue)s AND p.queue_id = e.queue_id
        UNION ALL
        SELECT 1 FROM consistency.resolved_entries r
         WHERE r.queue = %(queue)s AND r.queue_id = e.queue_id
           AND (r.uuid IS NOT DISTINCT FROM e.uuid OR consistency.to_uuid(r.uuid) = consistency.to_uuid(e.uuid))
        LIMIT 1) AS k ON TRUE
 WHERE (e.updated_at, e.queue_id) <= (w.updated_at, w.queue_id)
   AND (b.queue IS NULL OR (e.updated_at, e.queue_id) >= (b.updated_at, b.queue_id))
   AND k.known IS NULL;

-- drift_ledger_chunk: a chunk of a queue's ledger records from a queue_id on (the uuid as the queue spells it), with the portfolio transaction each settled and whether that transaction was settled before the queue's baseline; a queue_id holds one record per transaction applied under it
SELECT a.queue_id, COALESCE(a.uuid, a.txn_id::text), a.txn_id, a.status, t.status, t.accountid,
       COALESCE(t.updated_at < b.updated_at, FALSE) AS before_baseline
  FROM (SELECT queue, queue_id, uuid, txn_id, status
          FROM consistency.applied_entries
         WHERE queue = %(queue)s AND queue_id >= %(next)s
         ORDER BY queue_id
         LIMIT %(limit)s) AS a
  LEFT JOIN LATERAL (SELECT status, accountid, updated_at
                       FROM portfolio_transactions
                      WHERE id = a.txn_id
                      LIMIT 1) AS t ON TRUE
  LEFT JOIN consistency.baseline b ON b.queue = a.queue;

-- drift_transaction_chunk: a chunk of portfolio transactions from an id on, with whether the ledger records each and whether it was settled before its queue's baseline
SELECT t.id, t.accountid, t.transaction_type, t.status, m.queue, r.recorded IS NOT NULL,
       COALESCE(t.updated_at < b.updated_at, FALSE) AS before_baseline
  FROM (SELECT id, accountid, transaction_type, status, updated_at
          FROM portfolio_transactions
         WHERE id >= %(next)s::uuid
         ORDER BY id
         LIMIT %(limit)s) AS t
  LEFT JOIN LATERAL (SELECT TRUE AS recorded
                       FROM consistency.applied_entries a
                      WHERE a.txn_id = t.id
                      LIMIT 1) AS r ON TRUE
  LEFT JOIN unnest(%(types)s::text[], %(queues)s::text[]) AS m(transaction_type, queue)
         ON m.transaction_type = t.transaction_type
  LEFT JOIN consistency.baseline b ON b.queue = m.queue;

-- Adoption: the baseline --------------------------------------------------------------------------------

-- queue_clock: queue-db's time, the clock its writers' updated_at follows
SELECT clock_timestamp();

-- unstarted_queues: the queues with no watermark stored yet: still at the (1970-01-01, 0) that migration 1
-- inserts (advance_watermark only moves forward, so such a row was never moved), no baseline, and no entry
-- applied, parked or resolved
SELECT w.queue
  FROM consistency.watermarks w
 WHERE (w.updated_at, w.queue_id) = ('1970-01-01 00:00:00+00'::timestamptz, 0)
   AND NOT EXISTS (SELECT 1 FROM consistency.baseline b WHERE b.queue = w.queue)
   AND NOT EXISTS (SELECT 1 FROM consistency.applied_entries a WHERE a.queue = w.queue)
   AND NOT EXISTS (SELECT 1 FROM consistency.parked_entries p WHERE p.queue = w.queue)
   AND NOT EXISTS (SELECT 1 FROM consistency.resolved_entries r WHERE r.queue = w.queue)
 ORDER BY w.queue;

-- queue_read_before: the next entries of a queue after one position and before another, in order, a page at a time
SELECT q.queue_id, q.account_number, q.uuid, q.status, q.updated_at::timestamptz
  FROM {table} q
 WHERE (q.updated_at, q.queue_id) > (%(after_ts)s, %(after_id)s)
   AND (q.updated_at, q.queue_id) < (%(before_ts)s, %(before_id)s)
 ORDER BY q.updated_at, q.queue_id
 LIMIT %(limit)s;

-- queue_read_by_id: the next rows of a queue after a queue_id, whatever their status, for the baseline action's walk
SELECT queue_id, account_number, uuid, status, updated_at::timestamptz
  FROM {table}
 WHERE queue_id > %(after_id)s
 ORDER BY queue_id
 LIMIT %(limit)s;

-- count_adoptable: of the given entries, those the baseline action would record: no ledger record under the
-- entry or its portfolio transaction, neither parked nor resolved
SELECT count(*)
  FROM unnest(%(queue_ids)s::integer[], %(uuids)s::text[]) AS e(queue_id, uuid)
 WHERE NOT EXISTS (SELECT 1 FROM consistency.applied_entries a WHERE a.queue = %(queue)s AND a.queue_id = e.queue_id
                      AND a.txn_id IS NULL)
   AND NOT EXISTS (SELECT 1 FROM consistency.applied_entries a WHERE a.txn_id = consistency.to_uuid(e.uuid))
   AND NOT EXISTS (SELECT 1 FROM consistency.parked_entries p WHERE p.queue = %(queue)s AND p.queue_id = e.queue_id)
   AND NOT EXISTS (SELECT 1 FROM consistency.resolved_entries r WHERE r.queue = %(queue)s AND r.queue_id = e.queue_id);

-- adopt_entries: record settled entries as applied without moving money, each under the entry and its portfolio
-- transaction as the apply records them (see consistency.record_batch_v1), where neither is recorded yet and the
-- entry is neither parked nor resolved, with an adopted journal record each; how many it recorded
WITH given AS (
    SELECT e.*, consistency.to_uuid(e.uuid) AS txn_id
      FROM unnest(%(queue_ids)s::integer[], %(accounts)s::text[], %(uuids)s::text[], %(statuses)s::text[],
                  %(updated)s::timestamptz[]) AS e(queue_id, account_number, uuid, status, updated_at)
), recorded AS (
    INSERT INTO consistency.applied_entries (queue, queue_id, uuid, txn_id, status)
    SELECT %(queue)s, g.queue_id, NULLIF(g.uuid, g.txn_id::text), g.txn_id, g.status
      FROM given g
     WHERE NOT EXISTS (SELECT 1 FROM consistency.applied_entries a WHERE a.queue = %(queue)s AND a.queue_id = g.queue_id
                          AND (a.txn_id IS NULL OR a.txn_id = g.txn_id))
       AND NOT EXISTS (SELECT 1 FROM consistency.parked_entries p WHERE p.queue = %(queue)s AND p.queue_id = g.queue_id)
       AND NOT EXISTS (SELECT 1 FROM consistency.resolved_entries r WHERE r.queue = %(queue)s AND r.queue_id = g.queue_id)
     ORDER BY g.updated_at, g.queue_id
        ON CONFLICT DO NOTHING
    RETURNING queue_id, status
), journaled AS (
    INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, reason, actor)
    SELECT %(queue)s, r.queue_id, g.account_number, %(kind)s, r.status, %(reason)s, %(actor)s
      FROM recorded r
      JOIN given g ON g.queue_id = r.queue_id
)
SELECT count(*) FROM recorded;

-- set_baseline: put a queue's baseline at a position, or move it there if it stood before it; never back
INSERT INTO consistency.baseline AS b (queue, updated_at, queue_id, source, set_by)
VALUES (%(queue)s, %(ts)s, %(id)s, %(source)s, %(set_by)s)
    ON CONFLICT (queue) DO UPDATE
   SET updated_at = EXCLUDED.updated_at, queue_id = EXCLUDED.queue_id, source = EXCLUDED.source,
       set_by = EXCLUDED.set_by, set_at = CURRENT_TIMESTAMP
 WHERE (b.updated_at, b.queue_id) < (EXCLUDED.updated_at, EXCLUDED.queue_id);

-- select_baselines: the baseline in force per queue: settled entries before it are not applied
SELECT queue, updated_at, queue_id, source, set_by, set_at FROM consistency.baseline ORDER BY queue;

-- select_baseline: one queue's baseline, for the reconciliation sweep
SELECT updated_at, queue_id FROM consistency.baseline WHERE queue = %(queue)s;

-- select_watermarks_reads_and_baselines: how far each queue has been read (its watermark, and its read position in look-back mode, NULLs before the first), and the baseline in force, if any
SELECT w.queue, w.updated_at, w.queue_id, w.moved_at, w.read_updated_at, w.read_queue_id,
       b.updated_at, b.queue_id, b.source, b.set_by, b.set_at
  FROM consistency.watermarks w
  LEFT JOIN consistency.baseline b ON b.queue = w.queue
 ORDER BY w.queue;
