-- recent_count and recent_sum read buckets, not requests: per agent, action and minute, and
-- per agent, action and hour, how many requests are pending or approved (field '') and what
-- each summable numeric args key adds up to. Intake and every status change keep them in
-- the transaction that changes the requests; a window reads whole hours, whole minutes at
-- its ends, and the requests of its first, partial minute from requests_agent_action_created.
CREATE TABLE request_counters (
    agent          TEXT NOT NULL,
    action         TEXT NOT NULL,
    field          TEXT NOT NULL,
    span_seconds   BIGINT NOT NULL,
    bucket_start   BIGINT NOT NULL,
    requests       BIGINT NOT NULL,
    total          DOUBLE PRECISION NOT NULL,
    -- On '' rows: requests with too many numeric args for their sums to be kept here; a
    -- recent_sum over a window that holds one reads the requests themselves.
    overflow       BIGINT NOT NULL,
    PRIMARY KEY (agent, action, field, span_seconds, bucket_start)
);

-- The buckets the stored requests imply, by the rules intake keeps them: every counted
-- request in its '' rows; a request with more than 16 summable numeric args keys only
-- there (overflow 1); each summable key's whole value up to 2^31 in its field's rows, any
-- other value marked in their overflow instead.
CREATE TEMP TABLE summable ON COMMIT DROP AS
SELECT requests.id, requests.agent, requests.action, requests.created_at,
       fields.key, (fields.value #>> '{}')::numeric AS value
FROM requests
     CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(requests.body->'args') = 'object'
                                        THEN requests.body->'args' ELSE '{}'::jsonb END) AS fields
WHERE requests.status IN ('pending', 'approved')
  AND jsonb_typeof(fields.value) = 'number'
  AND fields.key ~ '^[A-Za-z0-9_]+$';

CREATE TEMP TABLE crowded ON COMMIT DROP AS
SELECT id FROM summable GROUP BY id HAVING COUNT(*) > 16;

INSERT INTO request_counters
    (agent, action, field, span_seconds, bucket_start, requests, total, overflow)
SELECT agent, action, '', spans.span_seconds,
       (floor(extract(epoch FROM created_at) / spans.span_seconds) * spans.span_seconds)::bigint,
       COUNT(*), COUNT(*), SUM(CASE WHEN id IN (SELECT id FROM crowded) THEN 1 ELSE 0 END)
FROM requests, (VALUES (60::bigint), (3600::bigint)) AS spans(span_seconds)
WHERE status IN ('pending', 'approved')
GROUP BY 1, 2, 3, 4, 5;

INSERT INTO request_counters
    (agent, action, field, span_seconds, bucket_start, requests, total, overflow)
SELECT agent, action, key, spans.span_seconds,
       (floor(extract(epoch FROM created_at) / spans.span_seconds) * spans.span_seconds)::bigint,
       COUNT(*),
       SUM(CASE WHEN value BETWEEN -2147483648 AND 2147483648 AND value = trunc(value)
                THEN value ELSE 0 END)::float8,
       SUM(CASE WHEN value BETWEEN -2147483648 AND 2147483648 AND value = trunc(value)
                THEN 0 ELSE 1 END)
FROM summable, (VALUES (60::bigint), (3600::bigint)) AS spans(span_seconds)
WHERE id NOT IN (SELECT id FROM crowded)
GROUP BY 1, 2, 3, 4, 5;
