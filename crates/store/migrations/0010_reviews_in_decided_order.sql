-- A dataset export reads decided reviews in the order people decided them, a page at a time after the last
-- page's (decided_at, id); without this index each page sorted every decided review again.
-- (On a large database it builds while the migration holds the write lock: expect a pause at the upgrade.)
CREATE INDEX reviews_in_decided_order ON reviews (status, decided_at, id);
