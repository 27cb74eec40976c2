-- Links written with time 0 between 0009 and 0011 (by a server older than 0009, still running during a rolling
-- upgrade to a release with 0009 but not 0011) were left at the end of every listing by policy and outside every
-- `since` filter: 0011 only repairs links written after it. They take their decision's time now. (One pass over
-- decision_policies at the upgrade; no index leads with the time.)
UPDATE decision_policies
SET created_at = (SELECT d.created_at FROM decisions d WHERE d.id = decision_policies.decision_id)
WHERE created_at = 0 AND EXISTS (SELECT 1 FROM decisions d WHERE d.id = decision_policies.decision_id);
