-- Agents: API keys are stored only as SHA-256 hashes.
CREATE TABLE agents (
    name            TEXT PRIMARY KEY,
    api_key_hash    TEXT NOT NULL UNIQUE,
    webhook_secret  TEXT NOT NULL,
    owners          JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    revoked_at      TIMESTAMPTZ
);

-- Requests: indexed columns for lookups and the compare-and-set, the full object in body.
CREATE TABLE requests (
    id          TEXT PRIMARY KEY,
    agent       TEXT NOT NULL REFERENCES agents(name),
    action      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired', 'cancelled')),
    revision    BIGINT NOT NULL,
    version     BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ,
    -- When a still-pending request is due a reminder / an escalation; cleared once done.
    remind_at   TIMESTAMPTZ,
    escalate_at TIMESTAMPTZ,
    updated_at  TIMESTAMPTZ NOT NULL,
    body        JSONB NOT NULL
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
    response         JSONB,
    created_at       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (agent, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- The audit chain: append-only, enforced below.
CREATE TABLE audit_events (
    seq         BIGINT PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL,
    request_id  TEXT,
    kind        TEXT NOT NULL,
    actor       TEXT NOT NULL,
    payload     JSONB NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_events_request ON audit_events (request_id);

CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- Work for the delivery worker, written in the same transaction as the change it reports.
-- A card row means "make the card at this destination show the request as it is now":
-- at most one is pending per (request, destination); later changes bump its generation.
CREATE TABLE outbox (
    id            BIGSERIAL PRIMARY KEY,
    request_id    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    destination   TEXT NOT NULL,
    payload       JSONB NOT NULL,
    state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'abandoned')),
    generation    INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    available_at  TIMESTAMPTZ NOT NULL,
    lease_until   TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ,
    last_error    TEXT
);
CREATE INDEX outbox_due ON outbox (available_at) WHERE state = 'pending';
CREATE UNIQUE INDEX outbox_one_pending_card ON outbox (request_id, kind, destination)
    WHERE state = 'pending' AND kind = 'card';

-- Where each request's card was posted, per destination (Slack channel + ts, Teams activity).
CREATE TABLE chat_messages (
    request_id   TEXT NOT NULL,
    destination  TEXT NOT NULL,
    message      JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (request_id, destination)
);
