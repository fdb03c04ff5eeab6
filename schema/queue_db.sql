-- queue-db: owned by user-request-queue-svc. Shipped here for development, tests and the demo.
-- The consistency manager only reads these tables.

CREATE OR REPLACE FUNCTION set_updated_at() RETURNS trigger AS $$
BEGIN
    -- CURRENT_TIMESTAMP is the start time of the writer's transaction.
    NEW.updated_at = CURRENT_TIMESTAMP;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TABLE IF NOT EXISTS investment_queue (
    queue_id       SERIAL PRIMARY KEY,
    account_number VARCHAR(20),
    tier_1         DECIMAL(20, 8) NOT NULL DEFAULT 0,
    tier_2         DECIMAL(20, 8) NOT NULL DEFAULT 0,
    tier_3         DECIMAL(20, 8) NOT NULL DEFAULT 0,
    uuid           VARCHAR(36) UNIQUE,
    status         VARCHAR(20) NOT NULL DEFAULT 'PENDING'
                   CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    processed_at   TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS withdrawal_queue (
    queue_id       SERIAL PRIMARY KEY,
    account_number VARCHAR(20),
    tier_1         DECIMAL(20, 8) NOT NULL DEFAULT 0,
    tier_2         DECIMAL(20, 8) NOT NULL DEFAULT 0,
    tier_3         DECIMAL(20, 8) NOT NULL DEFAULT 0,
    uuid           VARCHAR(36) UNIQUE,
    status         VARCHAR(20) NOT NULL DEFAULT 'PENDING'
                   CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    processed_at   TIMESTAMPTZ
);

DROP TRIGGER IF EXISTS investment_queue_updated_at ON investment_queue;
CREATE TRIGGER investment_queue_updated_at BEFORE UPDATE ON investment_queue
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

DROP TRIGGER IF EXISTS withdrawal_queue_updated_at ON withdrawal_queue;
CREATE TRIGGER withdrawal_queue_updated_at BEFORE UPDATE ON withdrawal_queue
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Required in production: the consistency manager reads each queue by (updated_at, queue_id).
CREATE INDEX IF NOT EXISTS investment_queue_updated_at_queue_id
    ON investment_queue (updated_at, queue_id);
CREATE INDEX IF NOT EXISTS withdrawal_queue_updated_at_queue_id
    ON withdrawal_queue (updated_at, queue_id);
