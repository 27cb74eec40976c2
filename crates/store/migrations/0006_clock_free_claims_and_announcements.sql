-- A job claim takes a running job whose lease lapsed, else the oldest pending one (`Store::claim_job`): each a
-- range of one index. The single `pending OR lapsed` query before sorted the whole backlog on every claim.
CREATE INDEX jobs_by_lease ON jobs (status, locked_until);
-- Only reviews the bus must hear of wait to be announced: a review or appeal of a decision from NATS, or of an
-- HTTP appeal of one (`ANNOUNCEABLE` in reviews.rs). `Store::decide_review` marks every other review announced
-- as it is decided; this marks those decided before, which nobody will ever publish.
UPDATE reviews SET announced_at = COALESCE(decided_at, created_at)
WHERE status = 'decided' AND announced_at IS NULL
  AND NOT (kind IN ('review', 'appeal') AND EXISTS (SELECT 1 FROM decisions d
    WHERE d.id = reviews.decision_id AND (d.source LIKE 'nats:%' OR (d.source = 'appeal' AND EXISTS
      (SELECT 1 FROM decisions o WHERE o.id = d.replay_of AND o.source LIKE 'nats:%')))));
-- The announcer's outbox (`Store::reviews_to_announce`), in the order it is read: a sweep reads what waits to be
-- published, never the decisions table. It leads with status, as `reviews_by_status` does, or SQLite's planner
-- (which has no statistics) prefers that index's `status = ?` and reads and sorts every decided review.
CREATE INDEX reviews_unannounced ON reviews (status, decided_at) WHERE status = 'decided' AND announced_at IS NULL;
