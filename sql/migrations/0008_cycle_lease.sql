-- The cycle lease: the right to apply, held by one process at a time across every replica, for a bounded
-- time. It replaces the session advisory lock, which a frozen process (SIGSTOP, a long pause, a partition)
-- held for as long as its session lived. A process takes the lease for a cycle (epoch + 1), renews it in
-- every transaction of the cycle through consistency.fence_cycle_lease, and gives it back at the end. A
-- lease not renewed within its time is free for another process, and a transaction of the old holder,
-- once it resumes, fails at its fence: in the same transaction as the writes it would have made. A lease
-- whose holder's session has ended (the process crashed, or the server ended it) is free at once, as the
-- advisory lock was.
CREATE TABLE consistency.cycle_lease (
    id               BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    holder           TEXT,  -- host:replica:pid of the process holding it; NULL once given back
    backend_pid      INTEGER,  -- the holder's session on this database (pg_stat_activity.pid)
    epoch            BIGINT NOT NULL DEFAULT 0,
    renewed_at       TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    expires_at       TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    -- When the last cycle started, by this database's clock: one cycle per POLLING_INTERVAL, whatever the
    -- number of processes that poll.
    cycle_started_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
INSERT INTO consistency.cycle_lease DEFAULT VALUES;

-- Renews the lease of this epoch for p_seconds, or raises when it is another epoch's: the first statement of
-- every transaction of a cycle. The row stays locked until the transaction ends, so that no other process
-- can take the lease while one of the holder's transactions is open.
CREATE FUNCTION consistency.fence_cycle_lease(p_epoch BIGINT, p_seconds DOUBLE PRECISION) RETURNS VOID
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE consistency.cycle_lease
       SET renewed_at = clock_timestamp(),
           expires_at = clock_timestamp() + make_interval(secs => p_seconds)
     WHERE epoch = p_epoch AND holder IS NOT NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the cycle lease of epoch % was lost: another process holds it now', p_epoch
              USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
END
$$;
