-- A policy link written without its decision's time (by a server from before 0009, still running during a rolling
-- upgrade, which leaves the column at its default 0) takes the time from its decision, so that the listing by
-- policy (which pages on it) never files it before every other decision. One statement, run whole.
CREATE OR REPLACE FUNCTION decision_policies_take_decision_time() RETURNS trigger AS $$
BEGIN
    IF NEW.created_at = 0 THEN
        NEW.created_at := COALESCE((SELECT d.created_at FROM decisions d WHERE d.id = NEW.decision_id), 0);
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql
