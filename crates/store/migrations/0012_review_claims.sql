-- A reviewer working an item holds it for a while (`Store::claim_review`): others see it taken, the page moves
-- them past it, and a decision by anyone else is refused until the claim lapses. NULL: nobody holds it.
ALTER TABLE reviews ADD COLUMN claimed_by TEXT;
ALTER TABLE reviews ADD COLUMN claimed_until BIGINT;
