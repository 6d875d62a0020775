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
    cols = {r["column_name"] for r in db.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'workers' AND table_name = 'processed_jobs'")}
    assert {"job_key", "status", "attempts", "lease_expires_at", "completed_at"} <= cols
