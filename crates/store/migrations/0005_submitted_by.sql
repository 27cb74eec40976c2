-- The client that submitted a decision or a job: its API key's name (never the secret). It may appeal the
-- decision and read the job back without the review scope. NULL where no key was asked for (items from the bus,
-- a keyless server) and in rows stored before this column; those have no owner.
-- A job's Idempotency-Key is kept scoped by this owner (see `Store::enqueue_job`) rather than by a new unique
-- index: rebuilding the table would race servers of the previous version still writing to it, and would break
-- their `ON CONFLICT (idempotency_key)` inserts.
ALTER TABLE decisions ADD COLUMN submitted_by TEXT;
ALTER TABLE jobs ADD COLUMN submitted_by TEXT;
