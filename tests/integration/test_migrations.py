from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backend.config import QUEUES
from backend.db import ledger
from backend.db.migrate import (
    LOCK_KEY,
    applied_versions,
    apply_migrations,
    current_version,
    latest_version,
    missing_for_workers,
    needed_version,
    older_live_workers,
)
from backend.db.migration_lock import LockWait, MigrationLockTimeout
from backend.db.rollbacks import ReleaseTooOld
from tests.helpers import wait_until
from tools.worker_inspector.report import pending_contracts


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


def test_migrating_does_not_wait_for_a_transaction_writing_a_queue(
    db: psycopg.Connection[Any], clean_db: str
) -> None:
    """A worker's batch deletes its messages inside its transaction (a frozen one holds that
    lock until the server ends it): a booting worker's migration must not wait for it, or
    every other worker's next write would queue behind the migration."""
    with psycopg.connect(clean_db) as worker:
        worker.execute("DELETE FROM pgmq.q_q_escalation")  # open: holds the queue's row-exclusive lock
        with psycopg.connect(clean_db, autocommit=True, row_factory=dict_row) as booting:
            booting.execute("SET lock_timeout = '2s'")
            started = time.monotonic()
            assert apply_migrations(booting) == []
            assert time.monotonic() - started < 2
        worker.rollback()


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
    from backend.db.install import ensure_queue

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


OLD_CLAIM = (
    "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts)"
    " VALUES (%s, %s, 1, 'completed', 1) ON CONFLICT (job_key) DO NOTHING"
)


@pytest.fixture
def fresh_url(db: psycopg.Connection[Any], clean_db: str) -> Iterator[str]:
    """An empty database of its own, for a migration applied step by step."""
    db.execute("DROP DATABASE IF EXISTS migrate_live WITH (FORCE)")
    db.execute("CREATE DATABASE migrate_live")
    try:
        yield urlunsplit(urlsplit(clean_db)._replace(path="/migrate_live"))
    finally:
        db.execute("DROP DATABASE migrate_live WITH (FORCE)")


def test_the_key_per_queue_migration_is_safe_beside_running_workers(fresh_url: str) -> None:
    queues = ("q_collectability", "q_escalation")
    with psycopg.connect(fresh_url, autocommit=True, row_factory=dict_row) as conn:
        apply_migrations(conn, queues=queues, up_to=5)
        conn.execute(OLD_CLAIM, ("k-before", "q_collectability"))
        # An older worker's batch is open while the index is built: CONCURRENTLY waits for
        # it to end, but never blocks the writes of the others meanwhile.
        with psycopg.connect(fresh_url) as open_batch:
            open_batch.execute(OLD_CLAIM, ("k-open", "q_collectability"))
            migrating = threading.Thread(target=_migrate, args=(fresh_url, queues, 6))
            migrating.start()
            wait_until(lambda: _waiting_on_lock(conn), timeout=10)
            started = time.monotonic()
            for n in range(20):
                conn.execute(OLD_CLAIM, (f"k-during-{n}", "q_collectability"))
            assert time.monotonic() - started < 1
            assert migrating.is_alive()
            open_batch.commit()
        migrating.join(timeout=10)
        assert current_version(conn) == 6
        # Both versions' claims work at schema 6: the old one conflicts on the key alone.
        conn.execute(OLD_CLAIM, ("k-before", "q_collectability"))
        assert ledger.claim(
            conn, queue="q_collectability", worker_id="w", keys=["k-new"], msg_ids=[2], lease_s=30
        ) == {"k-new": 1}
        assert 7 not in {m for m in range(1, needed_version() + 1) if m in missing_for_workers(conn)}

        # A live worker of the older code defers the contract step; a stopped one does not.
        _heartbeat(conn, "old-worker", schema=None)
        _heartbeat(conn, "new-worker", schema=latest_version())
        assert older_live_workers(conn, 6) == ["old-worker"]
        # The contract step waits; the expand steps after it do not, and a worker of this
        # code has all it needs without it.
        later = [m for m in range(8, latest_version() + 1)]
        assert apply_migrations(conn, queues=queues) == later
        assert 7 not in applied_versions(conn) and missing_for_workers(conn) == []
        # The inspector says why it waits, then that it is due.
        waiting = pending_contracts(conn)
        assert [(f.code, f.subject) for f in waiting] == [("migration_pending", "7")]
        assert "waits for 1 live worker(s) older than schema 6" in waiting[0].message
        conn.execute("UPDATE workers.heartbeats SET status = 'STOPPED', stopped_at = now()")
        assert "is due" in pending_contracts(conn)[0].message
        assert apply_migrations(conn, queues=queues) == [7]
        assert _requirements(conn) == {7: 6}  # recorded with the step: code older than 6 refuses
        assert pending_contracts(conn) == []
        assert applied_versions(conn) == set(range(1, latest_version() + 1))

        pkey = conn.execute(
            "SELECT pg_get_constraintdef(oid) AS d FROM pg_constraint WHERE conname = 'processed_jobs_pkey'"
        ).fetchone()
        assert pkey is not None and pkey["d"] == "PRIMARY KEY (queue_name, job_key)"
        for queue in queues:
            assert ledger.claim(
                conn, queue=queue, worker_id="w", keys=["k-shared"], msg_ids=[3], lease_s=30
            ) == {"k-shared": 1}
        assert conn.execute("SELECT count(*) AS n FROM workers.processed_jobs").fetchone() == {"n": 25}


def _migrate(url: str, queues: tuple[str, ...], up_to: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn, queues=queues, up_to=up_to)


def _waiting_on_lock(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE '%%CREATE UNIQUE INDEX CONCURRENTLY%%'"
        " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    ).fetchone()
    return bool(row and row["n"])


def _heartbeat(conn: psycopg.Connection[Any], worker_id: str, schema: int | None) -> None:
    conn.execute(
        "INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname, pid,"
        " version, started_at, last_heartbeat_at, metadata)"
        " VALUES (%s, 'collectability', 'q_collectability', 'RUNNING', 'h', 1, 'v', now(), now(), %s)",
        (worker_id, Jsonb({} if schema is None else {"schema": schema})),
    )


def test_three_services_migrating_at_once_all_succeed(fresh_url: str) -> None:
    # One push deploys the three services: their pre-deploy migrates start together. One
    # builds an index CONCURRENTLY while the others wait for the lock, without a deadlock.
    queues = ("q_collectability",)
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            _migrate(fresh_url, queues, 99)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with psycopg.connect(fresh_url) as conn:
        assert applied_versions(conn) == set(range(1, latest_version() + 1))


def _requirements(conn: psycopg.Connection[Any]) -> dict[int, int]:
    rows = conn.execute(
        "SELECT version, requires_schema FROM workers.schema_migrations WHERE requires_schema IS NOT NULL"
    ).fetchall()
    return {r["version"]: r["requires_schema"] for r in rows}


def test_a_contract_step_applied_before_requirements_were_recorded_is_back_filled(fresh_url: str) -> None:
    with psycopg.connect(fresh_url, autocommit=True, row_factory=dict_row) as conn:
        apply_migrations(conn, queues=("q_collectability",), up_to=8)
        assert 7 in applied_versions(conn)
        apply_migrations(conn, queues=("q_collectability",))
        assert _requirements(conn) == {7: 6}  # from 0007's directive


def test_migrating_refuses_a_schema_with_a_contract_step_this_code_predates(
    db: psycopg.Connection[Any],
) -> None:
    future = latest_version() + 1
    db.execute(
        "INSERT INTO workers.schema_migrations (version, name, requires_schema) VALUES (%s, 'next', %s)",
        (future, future),
    )
    try:
        with pytest.raises(ReleaseTooOld, match=f"deploy a release of schema {future} or later"):
            apply_migrations(db)
    finally:
        db.execute("DELETE FROM workers.schema_migrations WHERE version = %s", (future,))
    assert apply_migrations(db) == []


def test_a_held_migration_lock_is_named_while_waited_for_then_given_up(
    db: psycopg.Connection[Any], clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(clean_db, autocommit=True, application_name="stuck-deploy") as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        pid = holder.info.backend_pid
        wait = LockWait(timeout_s=0.6, first_notice_s=0.1, notice_every_s=0.2, poll_s=0.05)
        started = time.monotonic()
        with pytest.raises(MigrationLockTimeout, match=f"pid {pid} \\(application_name 'stuck-deploy'"):
            apply_migrations(db, lock_wait=wait)
        assert 0.6 <= time.monotonic() - started < 2
    waiting = [
        getattr(r, "data", {}) for r in caplog.records if getattr(r, "event", None) == "MIGRATION_WAITING"
    ]
    assert len(waiting) >= 2 and all(w["holder_pid"] == pid for w in waiting)
    assert waiting[0]["holder_application_name"] == "stuck-deploy"
    assert apply_migrations(db, lock_wait=wait) == []  # the holder's session ended: its lock with it
