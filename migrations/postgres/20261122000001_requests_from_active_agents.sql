-- A revoked agent's key may still sit in a server's cache of recent submitters; the
-- database is what refuses its requests, atomically with the insert, so a revocation
-- made anywhere (another replica, the CLI) applies to the next submission.
CREATE FUNCTION requests_from_active_agents() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM agents WHERE name = NEW.agent AND revoked_at IS NOT NULL) THEN
        RAISE EXCEPTION 'agent revoked' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER requests_from_active_agents BEFORE INSERT ON requests
FOR EACH ROW EXECUTE FUNCTION requests_from_active_agents();
