-- Optional: queue-db tells the consistency manager at once when queue entries settle, so it applies them
-- within a fraction of a second instead of at its next poll. Without this file the service still polls
-- every POLLING_INTERVAL seconds; with it, polling stays the guarantee and notifications only wake it early.
-- Run by an owner of the queue tables; safe to run again:
--
--   psql -d queue-db -f schema/queue_notify.sql
--
-- To remove it: DROP FUNCTION notify_consistency_queue() CASCADE;

-- One call per statement, whatever the number of rows: a bulk write stays cheap. Only a statement that
-- leaves an entry in a terminal status notifies, so queueing and PROCESSING wake nobody. The payload is
-- the table name: PostgreSQL folds identical notifications of one transaction into one.
CREATE OR REPLACE FUNCTION notify_consistency_queue() RETURNS trigger AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM settled WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')) THEN
        PERFORM pg_notify('consistency_queue', TG_TABLE_NAME);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- A trigger with a transition table takes one event only: one trigger for INSERT, one for UPDATE.
DROP TRIGGER IF EXISTS investment_queue_notify_insert ON investment_queue;
CREATE TRIGGER investment_queue_notify_insert AFTER INSERT ON investment_queue
    REFERENCING NEW TABLE AS settled
    FOR EACH STATEMENT EXECUTE FUNCTION notify_consistency_queue();

DROP TRIGGER IF EXISTS investment_queue_notify_update ON investment_queue;
CREATE TRIGGER investment_queue_notify_update AFTER UPDATE ON investment_queue
    REFERENCING NEW TABLE AS settled
    FOR EACH STATEMENT EXECUTE FUNCTION notify_consistency_queue();

DROP TRIGGER IF EXISTS withdrawal_queue_notify_insert ON withdrawal_queue;
CREATE TRIGGER withdrawal_queue_notify_insert AFTER INSERT ON withdrawal_queue
    REFERENCING NEW TABLE AS settled
    FOR EACH STATEMENT EXECUTE FUNCTION notify_consistency_queue();

DROP TRIGGER IF EXISTS withdrawal_queue_notify_update ON withdrawal_queue;
CREATE TRIGGER withdrawal_queue_notify_update AFTER UPDATE ON withdrawal_queue
    REFERENCING NEW TABLE AS settled
    FOR EACH STATEMENT EXECUTE FUNCTION notify_consistency_queue();
