"""What boot asks of the server about this session and a queue: whether the session shows
under its worker id, whether it can write, whether the queue exists and notifies."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import tuple_row

Conn = psycopg.Connection[Any]


def session_named(conn: Conn, name: str) -> bool:
    """Whether pg_stat_activity shows this session under ``name`` (its application_name, as
    PostgreSQL truncates it): not so when a pooler names the server's sessions itself."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT application_name = left(%s, 63) FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            (name,),
        ).fetchone()
    return bool(row and row[0])


def read_only(conn: Conn) -> bool:
    """Whether this session cannot write (a standby, or ``default_transaction_read_only``)."""
    row = conn.execute("SELECT current_setting('transaction_read_only') = 'on' AS ro").fetchone()
    return bool(row and row["ro"])


def queue_exists(conn: Conn, queue: str) -> bool:
    """Whether ``queue``'s table exists (a catalog lookup: no lock on the table)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(
            "SELECT to_regclass(format('pgmq.%%I', 'q_' || %s)) IS NOT NULL", (queue,)
        ).fetchone()
    return bool(row and row[0])


def notifications_available(conn: Conn, queue: str) -> bool:
    """Whether inserts into ``queue`` notify: the migrations' statement-level trigger."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgmq'"
        " AND c.relname = 'q_' || %s AND t.tgname = 'workers_notify_insert') AS ok",
        (queue,),
    ).fetchone()
    return bool(row and row["ok"])


def notify_channel(queue: str) -> str:
    return f"pgmq.q_{queue}.INSERT"
