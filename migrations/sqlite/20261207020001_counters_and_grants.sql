-- Counters in `when` (recent_count, recent_sum) read an agent's recent requests for one
-- action: one index range per counter.
CREATE INDEX requests_agent_action_created ON requests (agent, action, created_at);

-- Standing grants: "approve and don't ask again, for a while". uses_left is spent by a
-- compare-and-set in the intake transaction; the full object lives in body.
CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    agent       TEXT NOT NULL,
    action      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    uses_left   INTEGER NOT NULL,
    revoked_at  TEXT,
    body        TEXT NOT NULL
);
CREATE INDEX grants_agent_action ON grants (agent, action, expires_at);
CREATE INDEX grants_created ON grants (created_at);
