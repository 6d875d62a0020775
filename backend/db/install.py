"""What ``python -m backend.db.migrate`` installs besides the versioned migrations: pgmq,
the queues with their insert notification, and the workers' least-privilege role."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from backend.db.queries import queue_exists, queue_table
from backend.errors import ConfigError

WORKER_ROLE = "dragonfly_worker"  # the workers' least-privilege role (worker_role.sql)
NOTIFY_TRIGGER = "workers_notify_insert"
PGMQ_NOTIFY_TRIGGER = "trigger_notify_queue_insert_listeners"


def _scalar(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row, whatever row factory ``conn`` has."""
    row = conn.cursor(row_factory=tuple_row).execute(sql, params).fetchone()
    return None if row is None else row[0]


def has_pgmq(conn: psycopg.Connection[Any]) -> bool:
    return bool(_scalar(conn, "SELECT to_regproc('pgmq.read_with_poll') IS NOT NULL"))


def ensure_pgmq(conn: psycopg.Connection[Any]) -> str:
    """pgmq by ``CREATE EXTENSION`` where the server has it, else the bundled SQL install."""
    if has_pgmq(conn):
        return "present"
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        return "extension"
    except psycopg.Error:
        pass
    try:
        from pgmq.install import install_pgmq_from_sql
    except ModuleNotFoundError:
        raise ConfigError(
            "SUPABASE_DB_URL",
            "the server has no pgmq extension, and pgmq's bundled SQL belongs to the local extra:"
            " install pgmq on the server (Supabase: Database, Extensions) or pip install -e '.[local]'",
        ) from None

    was_autocommit = conn.autocommit
    conn.autocommit = False
    try:
        version = install_pgmq_from_sql(conn=conn)
    finally:
        conn.commit()
        conn.autocommit = was_autocommit
    return f"sql {version}"


def ensure_queue(conn: psycopg.Connection[Any], queue: str) -> None:
    """Create the queue (idempotent) and attach the statement-level insert notification.

    An existing queue is left as it is: ``pgmq.create`` runs ``CREATE INDEX IF NOT EXISTS``
    on its table, which takes a share lock before it finds the index there, so it would wait
    for every transaction that writes the queue (a worker's batch deletes its messages with
    their claim; a frozen one holds that lock until the server ends its transaction), and
    every worker's next write would queue behind it.

    pgmq's own per-row notification (1.7 and later), if enabled, is switched off: it
    updates one shared throttle row per message, so a large batch in one transaction
    slows down quadratically and concurrent producers wait for each other.
    """
    if not queue_exists(conn, queue):
        conn.execute("SELECT pgmq.create(%s)", (queue,))
    if _has_trigger(conn, queue, PGMQ_NOTIFY_TRIGGER):
        conn.execute("SELECT pgmq.disable_notify_insert(%s)", (queue,))
    if not _has_trigger(conn, queue, NOTIFY_TRIGGER):
        conn.execute(
            f"CREATE TRIGGER {NOTIFY_TRIGGER} AFTER INSERT ON {queue_table(queue)}"
            " FOR EACH STATEMENT EXECUTE FUNCTION workers.notify_queue_insert()"
        )


def grant_worker_role(conn: psycopg.Connection[Any], queues: tuple[str, ...]) -> None:
    """Create the workers' least-privilege role (``dragonfly_worker``) if missing and grant
    it what the workers need, the queues included: reading, locking, delaying and deleting
    their messages, sending to any of them (escalation to the outbox, a replay)."""
    conn.execute(files("backend.db").joinpath("worker_role.sql").read_text().encode())
    for queue in queues:
        table = queue_table(queue)
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {WORKER_ROLE}")
        sequence = _scalar(conn, "SELECT pg_get_serial_sequence(%s, 'msg_id')", (table,))
        if sequence:
            conn.execute(f"GRANT USAGE ON SEQUENCE {sequence} TO {WORKER_ROLE}")


def _has_trigger(conn: psycopg.Connection[Any], queue: str, name: str) -> bool:
    return bool(
        _scalar(
            conn,
            "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgmq'"
            " AND c.relname = 'q_' || %s AND t.tgname = %s)",
            (queue, name),
        )
    )
