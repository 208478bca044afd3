-- 4: files that failed are remembered like successes, by size and mtime: an unchanged bad file is not decoded
-- (and warned about) again on every re-run; a changed one is retried. NULL: not known (walk errors, old rows).
ALTER TABLE errors ADD COLUMN size INTEGER;
ALTER TABLE errors ADD COLUMN mtime_ns INTEGER;
