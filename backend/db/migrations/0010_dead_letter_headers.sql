-- A dead letter keeps its message's pgmq headers (pgmq 1.5 and later have a `headers`
-- column on queue tables), so a replay re-sends them with the body. Nullable, no default:
-- adding it rewrites nothing, and older releases, which never name it, keep working.
ALTER TABLE workers.dead_letters ADD COLUMN IF NOT EXISTS headers jsonb;
