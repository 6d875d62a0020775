-- Insert notifications that work on every pgmq version (Supabase ships 1.4.4 and 1.5.1,
-- which have none): one NOTIFY per inserting statement, on pgmq's own channel name
-- 'pgmq.q_<queue>.INSERT'. A statement-level trigger costs the same for one message or a
-- batch of thousands, and touches no shared row (pgmq's per-row trigger updates one
-- throttle row per message). python -m backend.db.migrate attaches it to each queue.
CREATE OR REPLACE FUNCTION workers.notify_queue_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgmq.' || TG_TABLE_NAME || '.INSERT', NULL);
    RETURN NULL;
END;
$$;
