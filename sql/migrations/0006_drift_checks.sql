-- Drift checks: proof that queue-db, the ledger and the portfolio transactions agree. Every check is kept
-- with its report; a check only reads the queue, the ledger and the portfolio transactions, and writes
-- nothing but these two tables.

-- One row per check. A running check stores, after each chunk it reads, where each phase goes on
-- (positions), the rows read so far and the findings counted by kind, so that any process can resume it
-- after a restart. counts are exact; drift_findings keeps only the first 1000 of each kind
-- (drift.FINDINGS_KEPT).
CREATE TABLE consistency.drift_checks (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_by  TEXT NOT NULL,  -- the name of the token that started it, or 'schedule'
    reason      TEXT,
    state       TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'failed')),
    started_at  TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    finished_at TIMESTAMPTZ,
    positions   JSONB NOT NULL DEFAULT '{}',  -- per phase: {"next": the first key not read yet} or {"done": true}
    rows_read   BIGINT NOT NULL DEFAULT 0,
    counts      JSONB NOT NULL DEFAULT '{}',  -- findings by kind, exact
    error       TEXT
);
-- At most one check runs at a time, whichever process started it.
CREATE UNIQUE INDEX drift_checks_one_running ON consistency.drift_checks ((TRUE)) WHERE state = 'running';
-- The last finished check, for the metrics every process reads.
CREATE INDEX drift_checks_done ON consistency.drift_checks (id) WHERE state = 'done';

-- What a check found, with the entry or the transaction named: the first 1000 of each kind per check.
CREATE TABLE consistency.drift_findings (
    check_id       BIGINT NOT NULL REFERENCES consistency.drift_checks (id) ON DELETE CASCADE,
    id             BIGINT GENERATED ALWAYS AS IDENTITY,
    kind           TEXT NOT NULL,
    queue          TEXT,
    queue_id       INTEGER,
    uuid           TEXT,
    txn_id         UUID,
    account_number TEXT,
    detail         JSONB NOT NULL DEFAULT '{}',
    PRIMARY KEY (check_id, id)
);
