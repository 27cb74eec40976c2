-- When a person's decision on an item that came in over NATS was published (NULL: not yet). Reviews decided
-- before this column existed count as published: nobody can be waiting on them any more.
ALTER TABLE reviews ADD COLUMN announced_at BIGINT;
UPDATE reviews SET announced_at = decided_at WHERE status = 'decided';
