-- The review workflow: why an item is queued, when it is due, and what the person decided.
ALTER TABLE reviews ADD COLUMN kind TEXT NOT NULL DEFAULT 'review';
ALTER TABLE reviews ADD COLUMN reason TEXT;
ALTER TABLE reviews ADD COLUMN due_at BIGINT;
ALTER TABLE reviews ADD COLUMN outcome TEXT;
ALTER TABLE reviews ADD COLUMN policy_hash TEXT;
ALTER TABLE reviews ADD COLUMN overrides_model BIGINT;
CREATE INDEX reviews_by_decision ON reviews (decision_id);
