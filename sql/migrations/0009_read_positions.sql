-- Look-back mode at any size of history. The drain reads on from where it last read (the read position)
-- instead of from the stored watermark, which trails by LOOKBACK_WINDOW: an idle cycle reads nothing again.
-- The reconciliation sweep walks the (updated_at, queue_id) index from the stored watermark up to the read
-- position, applies what has no record (a commit later than the drain's reading, up to LOOKBACK_WINDOW
-- late), and moves the watermark to where every commit is in, by that bound: each entry is read once by
-- the drain and once by the sweep, whatever the history. When the sweep last started is kept here too, so
-- that it runs once per RECONCILE_INTERVAL for every process together.
ALTER TABLE consistency.watermarks
    ADD COLUMN read_updated_at TIMESTAMPTZ,  -- NULL: read from the watermark
    ADD COLUMN read_queue_id INTEGER,
    ADD COLUMN swept_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity';
