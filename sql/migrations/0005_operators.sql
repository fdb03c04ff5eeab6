-- What operators need to prove every balance and act on what is stuck: the journal of every entry, the
-- entries dismissed by hand, the audit trail of operator actions and the pause.

-- Cycle numbers: every cycle that takes its turn draws one, and the journal names it.
CREATE SEQUENCE consistency.cycles;

-- The journal: what became of each entry, newest last. Every entry the service applies writes an
-- 'applied' row in the same transaction as its effects: its outcome (status), and for completed entries the
-- three tier amounts before and after, with the tier values in force (the newest tier_value_history row,
-- tier_version). Parkings (when they start and when their reason changes, not once per retry), their ends,
-- corrections and operator actions are written against the entry too. Kept as long as the ledger.
CREATE TABLE consistency.journal (
    id             BIGINT GENERATED ALWAYS AS IDENTITY,
    queue          TEXT NOT NULL,
    queue_id       INTEGER NOT NULL,
    account_number TEXT,
    kind           TEXT NOT NULL,
    status         TEXT,
    reason         TEXT,
    attempts       INTEGER,
    before         NUMERIC[],
    after          NUMERIC[],
    tier_version   BIGINT,
    cycle          BIGINT,
    actor          TEXT,
    at             TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (queue, queue_id, id)
);
CREATE INDEX journal_account ON consistency.journal (account_number, id);

-- Entries an operator dismissed: never applied, whatever their queue rows do later.
CREATE TABLE consistency.resolved_entries (
    queue          TEXT NOT NULL,
    queue_id       INTEGER NOT NULL,
    uuid           TEXT,
    account_number TEXT,
    status         TEXT,
    reason         TEXT NOT NULL,
    resolved_by    TEXT NOT NULL,
    resolved_at    TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (queue, queue_id)
);

-- Every change an operator made through the API: who, when, what, what it touched and why.
CREATE TABLE consistency.audit_log (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target JSONB NOT NULL DEFAULT '{}',
    reason TEXT,
    detail JSONB NOT NULL DEFAULT '{}'
);

-- The pause: while this row exists, no process applies anything.
CREATE TABLE consistency.pause (
    id        BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    paused_by TEXT NOT NULL,
    reason    TEXT NOT NULL,
    paused_at TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Where the service was adopted on a running system, per queue: the settled entries before this position were
-- applied by whatever ran before it. They are not applied, and a drift check does not count them as findings.
CREATE TABLE consistency.baseline (
    queue      TEXT PRIMARY KEY CHECK (queue IN ('investment', 'withdrawal')),
    updated_at TIMESTAMPTZ NOT NULL,
    queue_id   INTEGER NOT NULL,
    source     TEXT NOT NULL,  -- 'INITIAL_WATERMARK', or the baseline action
    set_by     TEXT,
    set_at     TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Claims the batch as claim_batch_v1 does, after leaving out the entries an operator resolved: they are never
-- applied, whatever their queue rows do later.
CREATE FUNCTION consistency.claim_batch_v2(p_queue TEXT, p_retrying BOOLEAN, p_terminal TEXT[], p_open TEXT[])
RETURNS BIGINT
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM pg_temp.cm_batch b
     USING consistency.resolved_entries r
     WHERE r.queue = p_queue AND r.queue_id = b.queue_id;
    RETURN consistency.claim_batch_v1(p_queue, p_retrying, p_terminal, p_open);
END
$$;
