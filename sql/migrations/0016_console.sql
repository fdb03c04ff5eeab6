-- What the operators' console keeps (console/): its sign-in sessions, the entries applied per minute that its
-- overview draws, and the summaries of the last cycles.

-- A signed-in console session. The cookie carries a random id; only its SHA-256 is kept here, so that reading
-- this table gives no session away. `token_digest` names the token it was opened with: a session whose token
-- is no longer accepted (rotated out of API_TOKENS_FILE) ends at its next request.
CREATE TABLE consistency.console_sessions (
    id_digest    TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    token_digest TEXT NOT NULL,
    csrf         TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    last_seen_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
-- Sessions idle past the expiry are deleted along this index, at each sign-in.
CREATE INDEX console_sessions_last_seen ON consistency.console_sessions (last_seen_at);

-- Entries applied per minute and queue, written in the transaction of each batch that applies them: what the
-- overview's chart shows. Rows older than a day are deleted as new minutes come.
CREATE TABLE consistency.applied_per_minute (
    minute  TIMESTAMPTZ NOT NULL,
    queue   TEXT NOT NULL,
    entries INTEGER NOT NULL,
    PRIMARY KEY (minute, queue)
);

-- The summaries of the last cycles, newest kept: the 100 newest, by cycle number.
CREATE TABLE consistency.recent_cycles (
    cycle   BIGINT PRIMARY KEY,
    summary JSONB NOT NULL
);
