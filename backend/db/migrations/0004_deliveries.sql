-- What each worker's transactional batch is running: its message ids, committed before the
-- handlers run. A batch's own transaction holds its messages by row lock, which ends with
-- the worker; this row outlives it, so the next worker to lock one of these messages knows
-- that its last delivery ended with its worker gone, and runs it alone, counted.
CREATE TABLE IF NOT EXISTS workers.deliveries (
    worker_id   text PRIMARY KEY,
    queue_name  text NOT NULL,
    msg_ids     bigint[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS deliveries_queue_idx ON workers.deliveries (queue_name);
