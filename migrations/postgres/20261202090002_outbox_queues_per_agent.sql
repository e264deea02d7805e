-- Fairness across agents (DESIGN §6, §8): the outbox worker reads the first due messages of
-- each (destination, agent) queue, so one agent's backlog for a channel cannot hide another
-- agent's card behind it. The agent is copied from the request when the row is written.
ALTER TABLE outbox ADD COLUMN agent TEXT NOT NULL DEFAULT '';
-- A webhook's receiver host (host:port), so destinations of a host at its cap of deliveries
-- in flight are left out of a read instead of filling it (empty for chat messages, and for
-- webhooks written before this column: those are simply never left out).
ALTER TABLE outbox ADD COLUMN host TEXT NOT NULL DEFAULT '';
UPDATE outbox SET agent = COALESCE((SELECT agent FROM requests WHERE requests.id = outbox.request_id), '')
    WHERE state = 'pending';
CREATE INDEX outbox_pending_by_queue ON outbox (destination, agent, available_at, id)
    WHERE state = 'pending';
-- Its prefix serves everything this one did.
DROP INDEX outbox_pending_by_destination;
