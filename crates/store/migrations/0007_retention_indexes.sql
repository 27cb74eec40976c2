-- Retention (`Store::prune`) keeps a decision that a kept appeal replays and a job whose webhook is still being
-- sent; both checks run once per candidate row, so each needs an index.
CREATE INDEX decisions_by_replay_of ON decisions (replay_of);
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id);
