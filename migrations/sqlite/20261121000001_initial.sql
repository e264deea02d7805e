-- Agents: API keys are stored only as SHA-256 hashes.
CREATE TABLE agents (
    name            TEXT PRIMARY KEY,
    api_key_hash    TEXT NOT NULL UNIQUE,
    webhook_secret  TEXT NOT NULL,
    owners          TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    revoked_at      TEXT
);

-- Requests: indexed columns for lookups and the compare-and-set, the full object in body.
CREATE TABLE requests (
    id          TEXT PRIMARY KEY,
    agent       TEXT NOT NULL REFERENCES agents(name),
    action      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired', 'cancelled')),
    revision    INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT,
    -- When a still-pending request is due a reminder / an escalation; cleared once done.
    remind_at   TEXT,
    escalate_at TEXT,
    updated_at  TEXT NOT NULL,
    body        TEXT NOT NULL
);
CREATE INDEX requests_status_expiry ON requests (status, expires_at);
CREATE INDEX requests_remind ON requests (remind_at) WHERE remind_at IS NOT NULL;
CREATE INDEX requests_escalate ON requests (escalate_at) WHERE escalate_at IS NOT NULL;
CREATE INDEX requests_agent_created ON requests (agent, created_at);

CREATE TABLE idempotency_keys (
    agent            TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    body_hash        TEXT NOT NULL,
    request_id       TEXT,
    response         TEXT,
    created_at       TEXT NOT NULL,
    PRIMARY KEY (agent, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- The audit chain: append-only, enforced below.
CREATE TABLE audit_events (
    seq         INTEGER PRIMARY KEY,
    at          TEXT NOT NULL,
    request_id  TEXT,
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_events_request ON audit_events (request_id);

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only');
END;

CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only');
END;

-- Work for the delivery worker, written in the same transaction as the change it reports.
-- A card row means "make the card at this destination show the request as it is now":
-- at most one is pending per (request, destination); later changes bump its generation.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    destination   TEXT NOT NULL,
    payload       TEXT NOT NULL,
    state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'abandoned')),
    generation    INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    available_at  TEXT NOT NULL,
    lease_until   TEXT,
    created_at    TEXT NOT NULL,
    finished_at   TEXT,
    last_error    TEXT
);
CREATE INDEX outbox_due ON outbox (available_at) WHERE state = 'pending';
CREATE UNIQUE INDEX outbox_one_pending_card ON outbox (request_id, kind, destination)
    WHERE state = 'pending' AND kind = 'card';

-- Where each request's card was posted, per destination (Slack channel + ts, Teams activity).
CREATE TABLE chat_messages (
    request_id   TEXT NOT NULL,
    destination  TEXT NOT NULL,
    message      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (request_id, destination)
);
