-- Fencing tokens for Idempotency-Key reservations. A reservation in flight for over a minute
-- is taken over by a later attempt with a new token; a request inserted under the key
-- commits only if the key still holds its attempt's token (`UPDATE ... WHERE token = ?` in
-- the insert's transaction, which rolls back when it changes no row), so a slow first
-- attempt and the attempt that took over can never both commit a request.
ALTER TABLE idempotency_keys ADD COLUMN token TEXT NOT NULL DEFAULT '';
