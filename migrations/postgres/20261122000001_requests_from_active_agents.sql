-- A revoked agent's key may still sit in a server's cache of recent submitters; the
-- database is what refuses its requests, atomically with the insert, so a revocation
-- made anywhere (another replica, the CLI) applies to the next submission.
--
-- FOR SHARE conflicts with the revocation's row lock: an insert racing a revocation waits
-- for it and then sees it, so no request of an agent is committed after its revocation.
-- Both take the agent's row before the audit lock, so they cannot deadlock.
CREATE FUNCTION requests_from_active_agents() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    revoked timestamptz;
BEGIN
    SELECT revoked_at INTO revoked FROM agents WHERE name = NEW.agent FOR SHARE;
    IF revoked IS NOT NULL THEN
        RAISE EXCEPTION 'agent revoked' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER requests_from_active_agents BEFORE INSERT ON requests
FOR EACH ROW EXECUTE FUNCTION requests_from_active_agents();
