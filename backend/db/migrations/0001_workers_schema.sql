-- The runtime's own tables: heartbeats, the idempotency ledger, dead letters.
CREATE SCHEMA IF NOT EXISTS workers;

CREATE TABLE IF NOT EXISTS workers.heartbeats (
    worker_id          text PRIMARY KEY,
    worker_name        text NOT NULL,
    queue_name         text NOT NULL,
    status             text NOT NULL
        CHECK (status IN ('BOOTING', 'RUNNING', 'DRAINING', 'STOPPED', 'CRASHED')),
    hostname           text NOT NULL,
    pid                integer NOT NULL,
    version            text NOT NULL,
    git_sha            text,
    started_at         timestamptz NOT NULL,
    last_heartbeat_at  timestamptz NOT NULL,
    stopped_at         timestamptz,
    jobs_processed     bigint NOT NULL DEFAULT 0,
    jobs_failed        bigint NOT NULL DEFAULT 0,
    rss_bytes          bigint,
    metadata           jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS heartbeats_queue_idx ON workers.heartbeats (queue_name);
CREATE INDEX IF NOT EXISTS heartbeats_stopped_idx ON workers.heartbeats (stopped_at)
    WHERE stopped_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS workers.processed_jobs (
    job_key           text PRIMARY KEY,
    queue_name        text NOT NULL,
    msg_id            bigint NOT NULL,
    status            text NOT NULL
        CHECK (status IN ('processing', 'completed', 'failed', 'dead')),
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    worker_id         text,
    lease_expires_at  timestamptz,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at      timestamptz
);
-- Stuck claims (the inspector) and retention read these.
CREATE INDEX IF NOT EXISTS processed_jobs_processing_idx
    ON workers.processed_jobs (lease_expires_at) WHERE status = 'processing';
CREATE INDEX IF NOT EXISTS processed_jobs_completed_idx
    ON workers.processed_jobs (completed_at) WHERE status = 'completed';

CREATE TABLE IF NOT EXISTS workers.dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue_name   text NOT NULL,
    msg_id       bigint NOT NULL,
    job_key      text,
    message      jsonb,
    error        text NOT NULL,
    error_type   text NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    worker_id    text,
    dead_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    replayed_at  timestamptz
);
CREATE INDEX IF NOT EXISTS dead_letters_queue_idx
    ON workers.dead_letters (queue_name, dead_at) WHERE replayed_at IS NULL;
