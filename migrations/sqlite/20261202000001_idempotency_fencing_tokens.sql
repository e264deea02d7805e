-- Fencing tokens for Idempotency-Key reservations. A reservation in flight for over a minute
-- is taken over by a later attempt with a new token; a request inserted under the key
-- commits only if the key still holds its attempt's token, so a slow first attempt and the
-- attempt that took over can never both commit a request.
ALTER TABLE idempotency_keys ADD COLUMN token TEXT NOT NULL DEFAULT '';

-- A group commit is one batch of statements and cannot look at an update's row count:
-- after answering a key (`UPDATE ... WHERE token = ?`), the batch inserts a row here, whose
-- trigger aborts the batch unless the answer landed. The table never holds a row.
CREATE TABLE idempotency_fences (
    agent            TEXT NOT NULL,
    idempotency_key  TEXT NOT NULL,
    request_id       TEXT NOT NULL
);

CREATE TRIGGER idempotency_fences_check BEFORE INSERT ON idempotency_fences
BEGIN
    SELECT CASE
        WHEN NOT EXISTS (
            SELECT 1 FROM idempotency_keys
            WHERE agent = NEW.agent AND idempotency_key = NEW.idempotency_key
              AND request_id = NEW.request_id
        ) THEN RAISE(ABORT, 'idempotency key taken over')
        ELSE RAISE(IGNORE)
    END;
END;
