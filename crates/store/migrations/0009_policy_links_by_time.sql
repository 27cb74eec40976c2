-- `Store::list_decisions` for one policy pages through its links newest first: each link carries its decision's
-- time, and the indexes lead with the policy so that a page reads about a page of links. Before, every page read
-- all of the policy's links and sorted their decisions. The new indexes begin with what the old ones held, so
-- retention's look-up by hash uses them instead. The old ones go first, so the backfill need not update them.
-- (On a large database the backfill rewrites every link and the indexes build while the migration holds the
-- write lock, on PostgreSQL an exclusive lock on the table: expect a pause at the upgrade, roughly as long as
-- copying decision_policies. PostgreSQL keeps the old row versions until it next vacuums the table.)
DROP INDEX decision_policies_by_name;
DROP INDEX decision_policies_by_hash;
-- The default is for the rows already there, until the backfill below: every insert names the time (but one
-- from a server older than this migration, which 0011 repairs as it is written).
ALTER TABLE decision_policies ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
UPDATE decision_policies SET created_at = d.created_at FROM decisions d WHERE d.id = decision_policies.decision_id;
CREATE INDEX decision_policies_by_name_time ON decision_policies (policy_name, created_at, decision_id);
CREATE INDEX decision_policies_by_hash_time ON decision_policies (policy_hash, created_at, decision_id);
