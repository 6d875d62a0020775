-- A dead letter is open until it is replayed or discarded (python -m tools.worker_inspector
-- dead-letters discard): a bad enqueue must not keep the verdict unhealthy for good. A
-- discarded letter keeps its body and reason until retention deletes it. Both columns are
-- nullable without a default: adding them rewrites nothing, on a live database too.
ALTER TABLE workers.dead_letters
    ADD COLUMN IF NOT EXISTS discarded_at timestamptz,
    ADD COLUMN IF NOT EXISTS discard_reason text;
CREATE INDEX IF NOT EXISTS dead_letters_open_idx
    ON workers.dead_letters (queue_name, dead_at) WHERE replayed_at IS NULL AND discarded_at IS NULL;
DROP INDEX IF EXISTS workers.dead_letters_queue_idx;
-- Retention finds closed letters by when they were closed.
CREATE INDEX IF NOT EXISTS dead_letters_closed_idx
    ON workers.dead_letters (coalesce(replayed_at, discarded_at))
    WHERE replayed_at IS NOT NULL OR discarded_at IS NOT NULL;
