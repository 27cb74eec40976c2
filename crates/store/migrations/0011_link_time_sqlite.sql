-- A policy link written without its decision's time (by a server from before 0009, still running during a rolling
-- upgrade, which leaves the column at its default 0) takes the time from its decision, so that the listing by
-- policy (which pages on it) never files it before every other decision. One statement, run whole.
CREATE TRIGGER decision_policies_take_decision_time AFTER INSERT ON decision_policies
WHEN NEW.created_at = 0
BEGIN
    UPDATE decision_policies
    SET created_at = COALESCE((SELECT d.created_at FROM decisions d WHERE d.id = NEW.decision_id), 0)
    WHERE decision_id = NEW.decision_id AND policy_hash = NEW.policy_hash;
END
