"""What ``python -m backend.db.migrate`` installs besides the versioned migrations: pgmq,
the queues with their insert notification, and the workers' least-privilege role."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from backend.db.queries import queue_exists, queue_table
from backend.errors import ConfigError, describe

WORKER_ROLE = "dragonfly_worker"  # the workers' least-privilege role (worker_role.sql)
WORKER_POLICY = "dragonfly_worker_rows"  # its policy on each queue table (row-level security)
NOTIFY_TRIGGER = "workers_notify_insert"
PGMQ_NOTIFY_TRIGGER = "trigger_notify_queue_insert_listeners"


def _scalar(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row, whatever row factory ``conn`` has."""
    row = conn.cursor(row_factory=tuple_row).execute(sql, params).fetchone()
    return None if row is None else row[0]


def has_pgmq(conn: psycopg.Connection[Any]) -> bool:
    return bool(_scalar(conn, "SELECT to_regproc('pgmq.read_with_poll') IS NOT NULL"))


def ensure_pgmq(conn: psycopg.Connection[Any]) -> str:
    """pgmq by ``CREATE EXTENSION`` where the server has it (Supabase, the embedded dev
    server), else the bundled SQL install. A server that has the extension never gets the
    loose SQL: clients that ``CREATE EXTENSION pgmq`` themselves would fail on it."""
    if has_pgmq(conn):
        return "present"
    if _scalar(conn, "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')"):
        try:
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        except psycopg.Error as exc:
            raise ConfigError(
                "SUPABASE_DB_URL",
                f"the server has the pgmq extension, but CREATE EXTENSION pgmq failed ({describe(exc)}):"
                " connect as a user allowed to create it, or enable it once (Supabase: Database, Extensions)",
            ) from exc
        return "extension"
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
    their messages, sending to any of them (escalation to the outbox, a replay), and
    ``pgmq.metrics`` (which reads the queue's sequence).

    Each queue table also gets a permissive policy for the role, whether or not row-level
    security is on: Supabase's linter asks for RLS on tables the API exposes, and a table
    with RLS on and no policy for a role shows that role no rows at all, without an error.
    A policy rather than ``BYPASSRLS``: a role attribute is not inherited by the members of
    a group (the workers log in as a member), and only a superuser may grant it."""
    conn.execute(files("backend.db").joinpath("worker_role.sql").read_text().encode())
    for queue in queues:
        table = queue_table(queue)
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {WORKER_ROLE}")
        sequence = _scalar(conn, "SELECT pg_get_serial_sequence(%s, 'msg_id')", (table,))
        if sequence:
            conn.execute(f"GRANT USAGE, SELECT ON SEQUENCE {sequence} TO {WORKER_ROLE}")
        if not _scalar(
            conn,
            "SELECT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = %s::regclass AND polname = %s)",
            (table, WORKER_POLICY),
        ):
            conn.execute(
                f"CREATE POLICY {WORKER_POLICY} ON {table} AS PERMISSIVE FOR ALL TO {WORKER_ROLE}"
                " USING (true) WITH CHECK (true)"
            )


# The commands a worker runs on its queue's table (the inspector only reads), and the
# letter ``pg_policy.polcmd`` gives each ('*' is a policy for all of them).
_COMMANDS = {"SELECT": "r", "INSERT": "a", "UPDATE": "w", "DELETE": "d"}
_HIDDEN = """
SELECT cmd FROM unnest(%(cmds)s::text[], %(letters)s::"char"[]) AS t(cmd, letter)
WHERE to_regclass(%(table)s) IS NOT NULL AND row_security_active(to_regclass(%(table)s))
  AND NOT EXISTS (
    SELECT 1 FROM pg_policy AS p
    WHERE p.polrelid = to_regclass(%(table)s) AND p.polpermissive AND p.polcmd IN ('*', t.letter)
      AND (0::oid = ANY (p.polroles)
           OR EXISTS (SELECT 1 FROM unnest(p.polroles) AS r(oid)
                      WHERE pg_has_role(current_user, r.oid, 'USAGE'))))
ORDER BY array_position(%(cmds)s::text[], cmd)"""


def rls_hidden(
    conn: psycopg.Connection[Any], queue: str, commands: tuple[str, ...] = tuple(_COMMANDS)
) -> str | None:
    """Why row-level security hides ``queue``'s rows from this session's role, or None.

    RLS on (and not bypassed: the owner, a superuser or ``BYPASSRLS``) with no permissive
    policy for any role of this session for one of ``commands``: such a role reads an empty
    queue, and deletes nothing, without an error. The policies' conditions are not read."""
    table = queue_table(queue)
    rows = (
        conn.cursor(row_factory=tuple_row)
        .execute(
            _HIDDEN, {"table": table, "cmds": list(commands), "letters": [_COMMANDS[c] for c in commands]}
        )
        .fetchall()
    )
    if not rows:
        return None
    user, name = conn.cursor(row_factory=tuple_row).execute(
        "SELECT current_user::text, to_regclass(%s)::text", (table,)
    ).fetchone() or (None, table)
    return (
        f"row-level security on {name} hides its rows from role {user} (no policy for"
        f" {', '.join(r[0] for r in rows)}): run `python -m backend.db.migrate` as the owner, which"
        f" creates the policy {WORKER_POLICY} for {WORKER_ROLE} (a member of it sees the rows),"
        " or create a permissive policy for this role"
    )


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
