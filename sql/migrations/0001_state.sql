-- The consistency manager's own state, in its own schema of user-portfolio-db.

CREATE TABLE consistency.tier_values (
    tier       SMALLINT PRIMARY KEY CHECK (tier BETWEEN 1 AND 3),
    pool       NUMERIC(20, 8) NOT NULL CHECK (pool > 0),
    market     NUMERIC(20, 8) NOT NULL CHECK (market >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE consistency.tier_value_history (
    id         BIGSERIAL PRIMARY KEY,
    tier       SMALLINT NOT NULL,
    old_pool   NUMERIC(20, 8),
    new_pool   NUMERIC(20, 8) NOT NULL,
    old_market NUMERIC(20, 8),
    new_market NUMERIC(20, 8) NOT NULL,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- How far each queue has been read: every entry at or before (updated_at, queue_id) is done.
CREATE TABLE consistency.watermarks (
    queue      TEXT PRIMARY KEY CHECK (queue IN ('investment', 'withdrawal')),
    updated_at TIMESTAMPTZ NOT NULL,
    queue_id   INTEGER NOT NULL,
    moved_at   TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);
INSERT INTO consistency.watermarks (queue, updated_at, queue_id)
VALUES ('investment', '1970-01-01 00:00:00+00', 0), ('withdrawal', '1970-01-01 00:00:00+00', 0);

-- One row per queue entry whose terminal status has been applied: the exactly-once record.
-- An entry is identified by its queue and queue_id, the queue table's primary key.
CREATE TABLE consistency.applied_entries (
    queue      TEXT NOT NULL,
    queue_id   INTEGER NOT NULL,
    uuid       TEXT,
    status     TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (queue, queue_id)
);

-- Terminal entries that could not be applied yet, retried every cycle.
CREATE TABLE consistency.parked_entries (
    queue           TEXT NOT NULL,
    queue_id        INTEGER NOT NULL,
    uuid            TEXT,
    account_number  TEXT,
    status          TEXT NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    reason          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 1,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    last_attempt_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (queue, queue_id)
);

-- The summary of the last finished cycle, shared by every process.
CREATE TABLE consistency.last_cycle (
    id      BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    summary JSONB NOT NULL
);
