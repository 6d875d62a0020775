from __future__ import annotations

from typing import Any

import psycopg

from backend.config import QUEUES
from backend.db.migrate import apply_migrations, current_version, latest_version


def test_migrations_are_idempotent_and_create_the_queues(db: psycopg.Connection[Any]) -> None:
    assert apply_migrations(db) == []
    assert current_version(db) == latest_version() >= 1
    names = {r["queue_name"] for r in db.execute("SELECT queue_name FROM pgmq.list_queues()")}
    assert set(QUEUES) <= names
    cols = {
        r["column_name"]
        for r in db.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'workers' AND table_name = 'processed_jobs'"
        )
    }
    assert {"job_key", "status", "attempts", "lease_expires_at", "completed_at"} <= cols


def test_every_queue_notifies_once_per_inserting_statement(
    db: psycopg.Connection[Any], clean_db: str
) -> None:
    from backend.db import queries as q

    for queue in QUEUES:
        assert q.notifications_available(db, queue)
    with psycopg.connect(clean_db, autocommit=True) as listener:
        listener.execute(f'LISTEN "{q.notify_channel("q_escalation")}"')
        db.execute("SELECT pgmq.send('q_escalation', '{}'::jsonb)")
        db.execute("SELECT pgmq.send_batch('q_escalation', array_fill('{}'::jsonb, array[500]))")
        got = [n.channel for n in listener.notifies(timeout=2, stop_after=2)]
        assert got == ["pgmq.q_q_escalation.INSERT"] * 2


def test_pgmq_row_level_notifications_are_replaced(db: psycopg.Connection[Any]) -> None:
    from backend.db import queries as q
    from backend.db.migrate import ensure_queue

    db.execute("SELECT pgmq.create('q_legacy')")
    db.execute("SELECT pgmq.enable_notify_insert('q_legacy', 0)")
    ensure_queue(db, "q_legacy")
    triggers = {
        r["tgname"]
        for r in db.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'pgmq.q_q_legacy'::regclass")
    }
    assert triggers == {"workers_notify_insert"}
    assert q.notifications_available(db, "q_legacy")
    db.execute("SELECT pgmq.drop_queue('q_legacy')")
