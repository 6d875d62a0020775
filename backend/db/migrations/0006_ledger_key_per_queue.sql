-- migrate: outside a transaction
-- A key is unique per queue (expand step). The claims of this version conflict on
-- (queue_name, job_key); the index is built without blocking the workers' writes, and the
-- workers of the previous version (ON CONFLICT (job_key)) keep working beside it. Until
-- 0007 makes it the ledger's key, the old key still refuses one key on two queues.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS processed_jobs_queue_key_idx
    ON workers.processed_jobs (queue_name, job_key);
