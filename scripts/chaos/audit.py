"""The audit of committed effects (schema ``chaos``): each row is written in the transaction
of its effect, so a rolled-back effect leaves none and an effect written twice is seen even
when the second write overwrote the first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]
Effects = Mapping[tuple[str, str], tuple[int, float]]  # (kind, job key) -> (count, first at)

AUDIT_SQL = """
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.effects (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind     text NOT NULL,
    job_key  text,
    subject  bigint,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS chaos.worker_effects (  -- written by scripts/chaos/worker.py
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_key  text NOT NULL,
    attempt  integer NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS chaos.waves (
    wave  integer PRIMARY KEY,
    at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Each row is written in the transaction of the effect: a rolled-back effect leaves none.
CREATE OR REPLACE FUNCTION chaos.record_effect() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_SCHEMA = 'workers' THEN
        INSERT INTO chaos.effects (kind, job_key) VALUES ('completed', NEW.job_key);
    ELSIF TG_TABLE_NAME = 'collectability_scores' THEN
        INSERT INTO chaos.effects (kind, job_key, subject) VALUES ('score', NEW.job_key, NEW.judgment_id);
    ELSIF TG_TABLE_NAME = 'enforcement_events' THEN
        INSERT INTO chaos.effects (kind, job_key, subject)
        VALUES ('recommendation', NEW.job_key, NEW.case_id);
    ELSE
        INSERT INTO chaos.effects (kind, job_key, subject)
        VALUES ('outbox_message', NEW.message ->> 'idempotency_key', NEW.msg_id);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS chaos_completed_insert ON workers.processed_jobs;
CREATE TRIGGER chaos_completed_insert AFTER INSERT ON workers.processed_jobs FOR EACH ROW
    WHEN (NEW.status = 'completed') EXECUTE FUNCTION chaos.record_effect();
DROP TRIGGER IF EXISTS chaos_completed ON workers.processed_jobs;
-- A completion is a move into 'completed', or a new attempt that completes at once (the
-- claim of a transactional batch writes 'completed' with the next attempt number).
CREATE TRIGGER chaos_completed AFTER UPDATE ON workers.processed_jobs FOR EACH ROW
    WHEN (NEW.status = 'completed'
          AND (OLD.status IS DISTINCT FROM 'completed' OR NEW.attempts > OLD.attempts))
    EXECUTE FUNCTION chaos.record_effect();
DROP TRIGGER IF EXISTS chaos_score ON dragonfly.collectability_scores;
CREATE TRIGGER chaos_score AFTER INSERT OR UPDATE ON dragonfly.collectability_scores
    FOR EACH ROW EXECUTE FUNCTION chaos.record_effect();
DROP TRIGGER IF EXISTS chaos_recommendation ON dragonfly.enforcement_events;
CREATE TRIGGER chaos_recommendation AFTER INSERT ON dragonfly.enforcement_events FOR EACH ROW
    WHEN (NEW.event_type = 'recommendation') EXECUTE FUNCTION chaos.record_effect();
DROP TRIGGER IF EXISTS chaos_outbox_message ON pgmq.q_q_outbox_processor;
CREATE TRIGGER chaos_outbox_message AFTER INSERT ON pgmq.q_q_outbox_processor FOR EACH ROW
    EXECUTE FUNCTION chaos.record_effect();
"""


def install_audit(conn: Conn) -> None:
    """Triggers that record every committed effect and every ledger completion in ``chaos``."""
    conn.execute(AUDIT_SQL)


def remove_audit(conn: Conn) -> None:
    """Drop the ``chaos`` schema; its function goes, and the triggers with it."""
    conn.execute("DROP SCHEMA IF EXISTS chaos CASCADE")


def counted_effects(conn: Conn) -> dict[tuple[str, str], tuple[int, float]]:
    """Each (kind, job key) audited: how many times, and when first."""
    rows = conn.execute(
        "SELECT kind, job_key, count(*) AS n, extract(epoch FROM min(at))::float8 AS first"
        " FROM chaos.effects WHERE job_key IS NOT NULL GROUP BY kind, job_key"
    ).fetchall()
    return {(r["kind"], r["job_key"]): (int(r["n"]), float(r["first"])) for r in rows}
