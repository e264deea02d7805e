-- INSERT OR REPLACE (and REPLACE INTO) on a sequence number that exists deletes that row
-- first, and SQLite fires no DELETE trigger for it (recursive_triggers is off): history
-- would be rewritten silently. Any insert onto a taken seq is refused instead. Appends
-- always take a new seq, so they never meet this.
CREATE TRIGGER audit_events_no_replace BEFORE INSERT ON audit_events
WHEN EXISTS (SELECT 1 FROM audit_events WHERE seq = NEW.seq)
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only');
END;
