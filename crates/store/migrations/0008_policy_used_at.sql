-- When a server last read a policy version to decide with (`Store::touch_policy`, at most hourly): a version
-- nobody has read for longer than the retention period, and that no kept decision names, may be pruned. NULL
-- (versions stored before) counts as the time it was stored.
ALTER TABLE policies ADD COLUMN used_at BIGINT;
