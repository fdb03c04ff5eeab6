-- The audit trail filtered by action, by actor, or by both, newest first, a page at a time (the console's audit
-- page, console/audit.py): each filter walks its own index down from the page's position, so that a page reads a
-- page's rows however long the trail grows and however rare the action or the actor is in it. The trail is
-- written once per operator action, so its indexes cost nothing that counts.
CREATE INDEX audit_log_action ON consistency.audit_log (action, id);
CREATE INDEX audit_log_actor ON consistency.audit_log (actor, id);
CREATE INDEX audit_log_actor_action ON consistency.audit_log (actor, action, id);
