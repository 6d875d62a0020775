-- migrate: after every live worker runs schema 6
-- A key is unique per queue (contract step): (queue_name, job_key) becomes the ledger's
-- primary key and the key alone no longer is. A worker older than schema 6 claims with
-- ON CONFLICT (job_key), which this breaks, so migrate defers this step while any such
-- worker still sends heartbeats. The swap reuses the index 0006 built: no table scan, an
-- exclusive lock held for milliseconds, and never waited for longer than lock_timeout.
SET LOCAL lock_timeout = '2s';
ALTER TABLE workers.processed_jobs
    DROP CONSTRAINT processed_jobs_pkey,
    ADD CONSTRAINT processed_jobs_pkey PRIMARY KEY USING INDEX processed_jobs_queue_key_idx;
