-- Where a chat platform says a conversation is reached (its service URL) and which tenant
-- it belongs to, recorded from the platform's verified inbound requests, so cards posted
-- later go to the same endpoint.
CREATE TABLE conversation_endpoints (
    destination  TEXT PRIMARY KEY,
    service_url  TEXT NOT NULL,
    tenant       TEXT,
    updated_at   TIMESTAMPTZ NOT NULL
);
