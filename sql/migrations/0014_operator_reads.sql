-- The reads an operator needs, each paged and answered by an index (issue 23).

-- The parked entries a filter matches, oldest first: each queue's entries are read in (parked_at, queue_id) order
-- from a position on, by queue alone or by account and queue, and the two queues' pages are merged (see
-- list_parked_page in sql/queries.sql). parked_at never changes while an entry stays parked, so a position holds.
-- They index no column a retry changes (parked_at never changes, account_number was indexed already), so a retry's
-- update stays as HOT as it was, and only a parking that starts or ends writes them.
CREATE INDEX parked_entries_by_queue ON consistency.parked_entries (queue, parked_at, queue_id);
CREATE INDEX parked_entries_by_account ON consistency.parked_entries (account_number, queue, parked_at, queue_id);

-- The tier values in force as of a tier_value_history id, three probes per id: each tier's newest row up to it.
CREATE INDEX tier_value_history_tier ON consistency.tier_value_history (tier, id);
