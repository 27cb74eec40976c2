-- Retention (`Store::prune`) keeps a decision that an appeal or replay names and a job whose webhook is still
-- being sent; both checks run once per candidate row, so each needs an index. Deliveries are read oldest first.
-- (On a large database these build while the migration holds the write lock: expect a pause at the upgrade.)
CREATE INDEX decisions_by_replay_of ON decisions (replay_of);
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id);
CREATE INDEX webhook_deliveries_by_time ON webhook_deliveries (created_at);
