"""Versioned, idempotent migrations of the ``workers`` schema (and the domain tables).

    python -m backend.db.migrate            # apply pending migrations, install pgmq, create queues
    python -m backend.db.migrate --check    # exit 1 when migrations are pending

Fit to be Railway's pre-deploy command. Safe to run from several processes at once:
an advisory lock serialises them.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import psycopg

from backend.config import QUEUES
from backend.db.queries import queue_exists, queue_table
from backend.errors import ConfigError, describe
from backend.events import Event
from backend.logs import log_event

WORKER_ROLE = "dragonfly_worker"  # the workers' least-privilege role (worker_role.sql)
_LOCK_KEY = 7_310_412_001  # pg_advisory_lock key of migrations
NOTIFY_TRIGGER = "workers_notify_insert"
PGMQ_NOTIFY_TRIGGER = "trigger_notify_queue_insert_listeners"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Directives a migration states in its first comment lines.
_OUTSIDE = "-- migrate: outside a transaction"
_AFTER = re.compile(r"^-- migrate: after every live worker runs schema (\d+)$", re.M)
_LIVE_WITHIN_S = 180  # a heartbeat younger than this (or three of its intervals) is a live worker's


@dataclass(frozen=True, kw_only=True)
class Migration:
    """One SQL file of ``backend/db/migrations``."""

    version: int
    name: str
    sql: str

    @property
    def outside_transaction(self) -> bool:
        """Each statement runs on its own (``CREATE INDEX CONCURRENTLY`` needs it)."""
        return _OUTSIDE in self.sql

    @property
    def after_workers_at(self) -> int | None:
        """A contract step: it breaks workers older than this schema, so it waits for them."""
        match = _AFTER.search(self.sql)
        return int(match[1]) if match else None

    def statements(self) -> list[str]:
        """The statements of a migration run outside a transaction (one per ``;`` line end)."""
        parts = re.split(r";\s*$", self.sql, flags=re.M)
        return [p.strip() for p in parts if re.sub(r"--[^\n]*", "", p).strip()]


def migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found = []
    for entry in files("backend.db").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(version=int(match[1]), name=match[2], sql=entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


@functools.cache
def latest_version() -> int:
    """The schema of this code: every migration it ships."""
    return max((m.version for m in migrations()), default=0)


@functools.cache
def needed_version() -> int:
    """The schema a worker of this code needs: all but the trailing contract steps, which
    wait for every older worker to be gone and which this code does not rely on."""
    return max((m.version for m in migrations() if m.after_workers_at is None), default=0)


def older_live_workers(conn: psycopg.Connection[Any], schema: int) -> list[str]:
    """Live workers (a recent heartbeat, not stopped) whose code is older than ``schema``."""
    rows = conn.execute(
        "SELECT worker_id AS w FROM workers.heartbeats WHERE stopped_at IS NULL"
        " AND status IN ('BOOTING', 'RUNNING', 'DRAINING')"
        " AND last_heartbeat_at > clock_timestamp() - make_interval(secs => greatest(%s,"
        " 3 * coalesce((metadata ->> 'heartbeat_interval_s')::float8, 0)))"
        " AND coalesce((metadata ->> 'schema')::int, 0) < %s ORDER BY worker_id",
        (_LIVE_WITHIN_S, schema),
    ).fetchall()
    return [str(_get(r, "w")) for r in rows]


def applied_versions(conn: psycopg.Connection[Any]) -> set[int]:
    """The versions applied, none when the ``workers`` schema is missing. A deferred
    contract step leaves a gap that later migrations do not wait for."""
    row = conn.execute("SELECT to_regclass('workers.schema_migrations') IS NOT NULL AS ok").fetchone()
    if not row or not _get(row, "ok"):
        return set()
    rows = conn.execute("SELECT version AS v FROM workers.schema_migrations").fetchall()
    return {int(_get(r, "v")) for r in rows}


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The highest applied version, 0 when the ``workers`` schema is missing."""
    return max(applied_versions(conn), default=0)


def missing_for_workers(conn: psycopg.Connection[Any]) -> list[int]:
    """The migrations a worker of this code needs that are not applied (every one but the
    contract steps, which wait for older workers and which this code does not rely on)."""
    needed = {m.version for m in migrations() if m.after_workers_at is None}
    return sorted(needed - applied_versions(conn))


def pending_versions(conn: psycopg.Connection[Any]) -> list[int]:
    return sorted({m.version for m in migrations()} - applied_versions(conn))


def _get(row: Any, key: str) -> Any:
    return row[key] if isinstance(row, dict) else row[0]


def has_pgmq(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regproc('pgmq.read_with_poll') IS NOT NULL AS ok").fetchone()
    return bool(row and _get(row, "ok"))


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
        row = conn.execute("SELECT pg_get_serial_sequence(%s, 'msg_id') AS seq", (table,)).fetchone()
        if row and _get(row, "seq"):
            conn.execute(f"GRANT USAGE ON SEQUENCE {_get(row, 'seq')} TO {WORKER_ROLE}")


def _has_trigger(conn: psycopg.Connection[Any], queue: str, name: str) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgmq'"
        " AND c.relname = 'q_' || %s AND t.tgname = %s) AS ok",
        (queue, name),
    ).fetchone()
    return bool(row and _get(row, "ok"))


def _lock(conn: psycopg.Connection[Any]) -> None:
    """Take the migrations' advisory lock by polling, never by waiting in one statement: a
    session blocked in pg_advisory_lock holds a snapshot that another service's CREATE INDEX
    CONCURRENTLY would wait for while that service holds the lock (a deadlock)."""
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s) AS ok", (_LOCK_KEY,)).fetchone()
        if row and _get(row, "ok"):
            return
        time.sleep(0.2)


def apply_migrations(
    conn: psycopg.Connection[Any], queues: tuple[str, ...] = QUEUES, up_to: int | None = None
) -> list[int]:
    """Install pgmq, apply pending migrations (up to ``up_to``), create the queues; return
    the versions applied. A contract step that live older workers still need is deferred
    to a later run (``MIGRATION_DEFERRED``); the migrations after it are applied."""
    conn.autocommit = True
    _lock(conn)
    try:
        ensure_pgmq(conn)
        conn.execute("CREATE SCHEMA IF NOT EXISTS workers")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS workers.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        done = applied_versions(conn)
        applied = []
        for migration in migrations():
            if migration.version in done:
                continue
            if up_to is not None and migration.version > up_to:
                break
            if not _apply(conn, migration):
                continue  # a deferred contract step: the expand steps after it still apply
            applied.append(migration.version)
            log_event(Event.MIGRATION_APPLIED, {"version": migration.version, "name": migration.name})
        for queue in queues:
            ensure_queue(conn, queue)
        grant_worker_role(conn, queues)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def _apply(conn: psycopg.Connection[Any], migration: Migration) -> bool:
    """Apply one migration; False when it is a contract step that must wait."""
    schema = migration.after_workers_at
    if schema is not None:
        older = older_live_workers(conn, schema)
        if older:
            log_event(
                Event.MIGRATION_DEFERRED,
                {
                    "version": migration.version,
                    "name": migration.name,
                    "older_workers": older,
                    "fix": f"it runs at the next migrate once every worker runs schema {schema} or later",
                },
                logging.WARNING,
            )
            return False
    for attempt in range(5):
        try:
            _run(conn, migration)
            return True
        except psycopg.errors.LockNotAvailable:
            # A contract step takes a short exclusive lock under a lock_timeout, so it never
            # holds the workers up behind a long transaction; it tries again a little later.
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
    return False


def _run(conn: psycopg.Connection[Any], migration: Migration) -> None:
    record = "INSERT INTO workers.schema_migrations (version, name) VALUES (%s, %s)"
    if migration.outside_transaction:
        _drop_invalid_indexes(conn)
        for statement in migration.statements():
            conn.execute(statement.encode())
        conn.execute(record, (migration.version, migration.name))
        return
    with conn.transaction():
        conn.execute(migration.sql.encode())
        conn.execute(record, (migration.version, migration.name))


def _drop_invalid_indexes(conn: psycopg.Connection[Any]) -> None:
    """An interrupted ``CREATE INDEX CONCURRENTLY`` leaves an invalid index that ``IF NOT
    EXISTS`` would take as done: drop it so the migration builds it again."""
    rows = conn.execute(
        "SELECT c.relname AS name FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'workers' AND NOT i.indisvalid"
    ).fetchall()
    for row in rows:
        conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS workers."{_get(row, "name")}"')


MIGRATION_URL = "SUPABASE_MIGRATION_DB_URL"


def migration_url_variable(env: Mapping[str, str]) -> str:
    """Migrations run as the owner of the schema: ``SUPABASE_MIGRATION_DB_URL`` when set (the
    workers then log in as a member of ``dragonfly_worker``), else ``SUPABASE_DB_URL``."""
    return MIGRATION_URL if env.get(MIGRATION_URL) else "SUPABASE_DB_URL"


def main(argv: list[str] | None = None) -> int:
    from backend.config import load_settings
    from backend.db.connect import connect, resolve_db_url
    from backend.dburl import secrets_of
    from backend.logs import add_secret, configure_logging

    parser = argparse.ArgumentParser(
        prog="python -m backend.db.migrate", description="Apply the workers schema migrations."
    )
    parser.add_argument(
        "--check", action="store_true", help="only report; exit 1 when migrations are pending"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(lenient=True, url_variable=migration_url_variable(os.environ))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    configure_logging(settings.log_level, secrets=secrets_of(settings.db_url))
    if settings.uses_transaction_pooler:
        print(
            "configuration error: SUPABASE_DB_URL: migrations need a session connection (the advisory"
            " lock and DDL); use the session pooler (port 5432) or the direct host, not port 6543",
            file=sys.stderr,
        )
        return 1
    try:
        url = resolve_db_url(settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    try:
        for secret in secrets_of(url):
            add_secret(secret)
        with connect(url, "dragonfly-migrate") as conn:
            if args.check:
                pending = pending_versions(conn)
                log_event(
                    Event.MIGRATION_STATUS,
                    {"current": current_version(conn), "latest": latest_version(), "pending": pending},
                )
                return 1 if pending else 0
            applied = apply_migrations(conn)
            log_event(
                Event.MIGRATIONS_DONE,
                {"applied": applied, "version": current_version(conn), "queues": list(QUEUES)},
            )
    except (psycopg.Error, ConfigError) as exc:
        log_event(
            Event.MIGRATION_FAILED,
            {"error": describe(exc), "error_type": type(exc).__name__},
            logging.ERROR,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
