-- One review per decision and kind. Queuing used to look before inserting, so two workers storing the same
-- decision at once could both insert. Of each group of duplicates the one a person already decided survives
-- (their decision must not be lost), else the earliest; then the database itself refuses a second one.
DELETE FROM reviews WHERE EXISTS (
    SELECT 1 FROM reviews AS keep
    WHERE keep.decision_id = reviews.decision_id AND keep.kind = reviews.kind AND keep.id <> reviews.id
      AND (CASE WHEN keep.status = 'decided' THEN 0 ELSE 1 END, keep.created_at, keep.id)
        < (CASE WHEN reviews.status = 'decided' THEN 0 ELSE 1 END, reviews.created_at, reviews.id)
);
CREATE UNIQUE INDEX reviews_one_per_decision_kind ON reviews (decision_id, kind);
-- The unique index leads with decision_id, so it serves every lookup the old one did.
DROP INDEX IF EXISTS reviews_by_decision;
