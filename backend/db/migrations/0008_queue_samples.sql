-- The history the inspector's report draws: each queue's depth, messages in flight and
-- the age of its oldest message, sampled once per WORKER_SAMPLE_INTERVAL_S (a minute) by
-- whichever worker of the queue gets there first in that interval: the key allows one row
-- per queue and interval however many replicas run. Pruned with the stopped heartbeats.
CREATE TABLE IF NOT EXISTS workers.queue_samples (
    queue_name    text NOT NULL,
    sampled_at    timestamptz NOT NULL,
    depth         bigint NOT NULL,
    in_flight     bigint,  -- null when the queue was too large to count within a second
    oldest_age_s  double precision,
    PRIMARY KEY (queue_name, sampled_at)
);
