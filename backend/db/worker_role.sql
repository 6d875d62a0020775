-- The workers' least-privilege role, granted again by every `python -m backend.db.migrate`
-- (so new tables and queues follow). A NOLOGIN group: operators give a login role
-- membership in it (docs/RAILWAY_WORKER_CONFIG.md, "A role for the workers"). It can run
-- the three workers and the inspector, and nothing else: no DDL, no other schema, no
-- write to a domain table a worker does not write. The queue tables are granted by
-- migrate, per queue (queue_grants below is not SQL of this file).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dragonfly_worker') THEN
        CREATE ROLE dragonfly_worker NOLOGIN;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA workers, dragonfly, pgmq TO dragonfly_worker;
-- The runtime's own state.
GRANT SELECT ON workers.schema_migrations TO dragonfly_worker;
GRANT SELECT, INSERT, UPDATE, DELETE
    ON workers.heartbeats, workers.processed_jobs, workers.deliveries TO dragonfly_worker;
-- Dead letters are written by the workers, deleted by retention once closed, closed by
-- the inspector (replay, discard).
GRANT SELECT, INSERT, UPDATE, DELETE ON workers.dead_letters TO dragonfly_worker;
-- The queue samples: written by the housekeeping thread, pruned by retention.
DO $$
BEGIN
    IF to_regclass('workers.queue_samples') IS NOT NULL THEN  -- from migration 0008 on
        GRANT SELECT, INSERT, DELETE ON workers.queue_samples TO dragonfly_worker;
    END IF;
END
$$;
-- The domain: collectability reads judgments and upserts scores; escalation reads cases,
-- judgments, scores, events and evidence and inserts recommendation events.
GRANT SELECT ON dragonfly.judgments, dragonfly.enforcement_cases, dragonfly.evidence,
    dragonfly.collectability_scores, dragonfly.enforcement_events TO dragonfly_worker;
GRANT INSERT, UPDATE ON dragonfly.collectability_scores TO dragonfly_worker;
GRANT INSERT ON dragonfly.enforcement_events TO dragonfly_worker;
-- pgmq.list_queues and pgmq.send (escalation's notifications, the inspector's replay).
GRANT SELECT ON pgmq.meta TO dragonfly_worker;
