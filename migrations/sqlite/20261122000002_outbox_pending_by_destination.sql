-- Claims walk the pending outbox one destination at a time (the first few due messages of
-- each), so a long backlog for one paced channel costs a claim a few index probes instead
-- of a scan of the whole backlog, and cannot hide other destinations' messages behind it.
DROP INDEX outbox_due;
CREATE INDEX outbox_pending_by_destination ON outbox (destination, available_at, id)
    WHERE state = 'pending';
