-- The per-agent pending cap (max_pending_per_agent) counts an agent's pending requests on
-- submissions near the cap: an index range over just those, not over all its requests.
CREATE INDEX requests_pending_by_agent ON requests (agent) WHERE status = 'pending';
