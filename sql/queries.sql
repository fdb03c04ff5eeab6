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

-- queue_read_terminal: entries of a queue after a queue_id that are not open (terminal, or an unknown
-- status), for the reconciliation sweep
SELECT queue_id, account_number, uuid, status, updated_at::timestamptz
  FROM {table}
 WHERE queue_id > %(after_id)s
   AND status IS DISTINCT FROM 'PENDING' AND status IS DISTINCT FROM 'PROCESSING'
 ORDER BY queue_id
 LIMIT %(limit)s;

-- queue_copy_batch: the next entries of a queue after a position, as COPY text for pg_temp.cm_batch (the cast reads a column without time zone in queue-db's TimeZone)
COPY (SELECT q.queue_id, q.account_number, q.uuid, q.status, q.updated_at::timestamptz
        FROM {table} q
       WHERE (q.updated_at, q.queue_id) > (%(after_ts)s, %(after_id)s)
       ORDER BY q.updated_at, q.queue_id
       LIMIT %(limit)s) TO STDOUT;

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

-- try_cycle_lock: take the cycle turn for this session if no other session holds it
SELECT pg_try_advisory_lock(%(key)s);

-- cycle_unlock: give the cycle turn back
SELECT pg_advisory_unlock(%(key)s);

-- select_watermarks: how far each queue has been read
SELECT queue, updated_at, queue_id, moved_at FROM consistency.watermarks ORDER BY queue;

-- select_cycle_start: where each queue's cycle starts, and whether it has parked entries to retry
SELECT w.queue, w.updated_at, w.queue_id,
       EXISTS (SELECT 1 FROM consistency.parked_entries p WHERE p.queue = w.queue)
  FROM consistency.watermarks w;

-- advance_watermark: move a queue's watermark forward, never back
UPDATE consistency.watermarks
   SET updated_at = %(ts)s, queue_id = %(id)s, moved_at = CURRENT_TIMESTAMP
 WHERE queue = %(queue)s
   AND (updated_at, queue_id) < (%(ts)s::timestamptz, %(id)s::integer);

-- savepoint_batch: mark a point to return to if the database rejects a batch applied set-based
SAVEPOINT batch;

-- rollback_to_batch: undo the rejected batch, keeping what the transaction did before it
ROLLBACK TO SAVEPOINT batch;

-- release_batch: keep the batch's work
RELEASE SAVEPOINT batch;

-- savepoint_entry: mark a point to return to if one entry is rejected
SAVEPOINT entry;

-- rollback_to_entry: undo the rejected entry only
ROLLBACK TO SAVEPOINT entry;

-- release_entry: keep the entry's work
RELEASE SAVEPOINT entry;

-- create_batch_table: the session's table of entries to apply, emptied at every commit
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

-- copy_into_batch: load COPY text from queue_copy_batch into the batch table
COPY pg_temp.cm_batch (queue_id, account_number, uuid, status, updated_at) FROM STDIN;

-- clear_batch_table: empty the batch table before loading entries into it within a transaction
DELETE FROM pg_temp.cm_batch;

-- load_batch_entries: load entries, and the reasons of those to park, into the batch table from arrays
INSERT INTO pg_temp.cm_batch (queue_id, account_number, uuid, status, updated_at, reason)
SELECT * FROM unnest(%(queue_ids)s::integer[], %(accounts)s::text[], %(uuids)s::text[],
                     %(statuses)s::text[], %(updated)s::timestamptz[], %(reasons)s::text[]);

-- park_batch: park the batch table's entries that have a reason (see sql/migrations/0002_set_based_apply.sql)
SELECT consistency.park_batch(%(queue)s);

-- batch_extent: how many entries the batch table holds, and the last one's position
SELECT count(*) OVER (), updated_at, queue_id
  FROM pg_temp.cm_batch
 ORDER BY updated_at DESC, queue_id DESC
 LIMIT 1;

-- claim_batch: step 1 of applying the batch table's entries, which leaves out the resolved ones and records the others once each; the corrections it noted (see sql/migrations/0005_operators.sql)
SELECT consistency.claim_batch_v2(%(queue)s, %(retrying)s, %(terminal)s::text[], %(open)s::text[]);

-- check_batch: step 2, which gives each claimed entry that cannot apply now its reason
SELECT consistency.check_batch_v1(%(transaction_type)s);

-- compound_batch: step 3, which compounds the completed entries on their portfolios
SELECT consistency.compound_batch_v1(%(columns)s, %(numerators)s::numeric[], %(denominators)s::numeric[]);

-- settle_batch: step 4, which parks the blocked entries, mirrors the others' statuses, and counts the outcomes
SELECT outcome, entries FROM consistency.settle_batch_v1(%(queue)s, %(terminal)s::text[], %(mirrored)s::text[]);

-- filter_unapplied: of the given entries, those neither applied nor parked
SELECT e.queue_id
  FROM unnest(%(queue_ids)s::integer[]) AS e(queue_id)
 WHERE NOT EXISTS (SELECT 1 FROM consistency.applied_entries a
                    WHERE a.queue = %(queue)s AND a.queue_id = e.queue_id)
   AND NOT EXISTS (SELECT 1 FROM consistency.parked_entries p
                    WHERE p.queue = %(queue)s AND p.queue_id = e.queue_id);

-- release_reopened: release parked entries whose queue rows are open again; the cycle reads them again when they settle
DELETE FROM consistency.parked_entries WHERE queue = %(queue)s AND queue_id = ANY(%(queue_ids)s::integer[]);

-- select_parked_batch: the next parked entries of a queue after a position, for a retry
SELECT queue_id, account_number, uuid, status, updated_at
  FROM consistency.parked_entries
 WHERE queue = %(queue)s
   AND (updated_at, queue_id) > (%(after_ts)s, %(after_id)s)
 ORDER BY updated_at, queue_id
 LIMIT %(limit)s;

-- list_parked: parked entries for the API, oldest first
SELECT queue, uuid, queue_id, account_number, status, reason, attempts, parked_at, last_attempt_at
  FROM consistency.parked_entries
 ORDER BY parked_at, queue, queue_id
 LIMIT %(limit)s;

-- count_parked: how many entries are parked
SELECT count(*) FROM consistency.parked_entries;

-- count_corrections: how many applied entries the queue has changed since
SELECT count(*) FROM consistency.corrections;

-- count_parked_and_corrections: how many entries are parked, and how many applied ones the queue has changed since
SELECT (SELECT count(*) FROM consistency.parked_entries), (SELECT count(*) FROM consistency.corrections);

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

-- save_last_cycle: keep the summary of the cycle that just finished
INSERT INTO consistency.last_cycle (id, summary) VALUES (TRUE, %(summary)s)
    ON CONFLICT (id) DO UPDATE SET summary = EXCLUDED.summary;

-- select_last_cycle: the summary of the last finished cycle
SELECT summary FROM consistency.last_cycle;

-- The audit trail -----------------------------------------------------------------------------------------

-- insert_audit: record an operator's action: who, what, what it touched and why
INSERT INTO consistency.audit_log (actor, action, target, reason, detail)
VALUES (%(actor)s, %(action)s, %(target)s, %(reason)s, %(detail)s)
RETURNING id, at;

-- list_audit: operator actions, newest first, below an id when given
SELECT id, at, actor, action, target, reason, detail
  FROM consistency.audit_log
 WHERE %(before)s::bigint IS NULL OR id < %(before)s::bigint
 ORDER BY id DESC
 LIMIT %(limit)s;

-- The journal ---------------------------------------------------------------------------------------------

-- insert_journal_record: write one record against an entry, such as an operator's action on it
INSERT INTO consistency.journal (queue, queue_id, account_number, kind, status, reason, attempts, actor, cycle)
VALUES (%(queue)s, %(queue_id)s, %(account)s, %(kind)s, %(status)s, %(reason)s, %(attempts)s, %(actor)s, %(cycle)s);

-- Operator actions on entries -----------------------------------------------------------------------------

-- The pause -----------------------------------------------------------------------------------------------

-- Drift checks --------------------------------------------------------------------------------------------

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
 WHERE NOT EXISTS (SELECT 1 FROM consistency.applied_entries a WHERE a.queue = %(queue)s AND a.queue_id = e.queue_id)
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
     WHERE NOT EXISTS (SELECT 1 FROM consistency.applied_entries a WHERE a.queue = %(queue)s AND a.queue_id = g.queue_id)
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

-- select_watermarks_and_baselines: how far each queue has been read, and the baseline in force, if any
SELECT w.queue, w.updated_at, w.queue_id, w.moved_at, b.updated_at, b.queue_id, b.source, b.set_by, b.set_at
  FROM consistency.watermarks w
  LEFT JOIN consistency.baseline b ON b.queue = w.queue
 ORDER BY w.queue;
