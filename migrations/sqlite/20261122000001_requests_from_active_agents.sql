-- A revoked agent's key may still sit in a server's cache of recent submitters; the
-- database is what refuses its requests, atomically with the insert, so a revocation
-- made anywhere (another replica, the CLI) applies to the next submission.
CREATE TRIGGER requests_from_active_agents BEFORE INSERT ON requests
WHEN (SELECT revoked_at FROM agents WHERE name = NEW.agent) IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'agent revoked');
END;
