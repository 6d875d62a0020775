"""Versioned, idempotent migrations of the ``workers`` schema (and the domain tables).

    python -m backend.db.migrate            # apply pending migrations, install pgmq, create queues
    python -m backend.db.migrate --check    # exit 1 when migrations are pending

Fit to be Railway's pre-deploy command. Safe to run from several processes at once:
an advisory lock serialises them.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import psycopg

from backend.config import QUEUES
from backend.db.queries import queue_table
from backend.errors import describe
from backend.events import Event
from backend.logs import log_event

_LOCK_KEY = 7_310_412_001  # pg_advisory_lock key of migrations
NOTIFY_TRIGGER = "workers_notify_insert"
PGMQ_NOTIFY_TRIGGER = "trigger_notify_queue_insert_listeners"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, kw_only=True)
class Migration:
    """One SQL file of ``backend/db/migrations``."""

    version: int
    name: str
    sql: str


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


def latest_version() -> int:
    return max((m.version for m in migrations()), default=0)


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The highest applied version, 0 when the ``workers`` schema is missing."""
    row = conn.execute("SELECT to_regclass('workers.schema_migrations') IS NOT NULL AS ok").fetchone()
    if not row or not _get(row, "ok"):
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) AS v FROM workers.schema_migrations").fetchone()
    return int(_get(row, "v"))


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
    from pgmq.install import install_pgmq_from_sql

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

    pgmq's own per-row notification (1.7 and later), if enabled, is switched off: it
    updates one shared throttle row per message, so a large batch in one transaction
    slows down quadratically and concurrent producers wait for each other.
    """
    conn.execute("SELECT pgmq.create(%s)", (queue,))
    if _has_trigger(conn, queue, PGMQ_NOTIFY_TRIGGER):
        conn.execute("SELECT pgmq.disable_notify_insert(%s)", (queue,))
    if not _has_trigger(conn, queue, NOTIFY_TRIGGER):
        conn.execute(
            f"CREATE TRIGGER {NOTIFY_TRIGGER} AFTER INSERT ON {queue_table(queue)}"
            " FOR EACH STATEMENT EXECUTE FUNCTION workers.notify_queue_insert()"
        )


def _has_trigger(conn: psycopg.Connection[Any], queue: str, name: str) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgmq'"
        " AND c.relname = 'q_' || %s AND t.tgname = %s) AS ok",
        (queue, name),
    ).fetchone()
    return bool(row and _get(row, "ok"))


def apply_migrations(conn: psycopg.Connection[Any], queues: tuple[str, ...] = QUEUES) -> list[int]:
    """Install pgmq, apply pending migrations, create the queues; return applied versions."""
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        ensure_pgmq(conn)
        conn.execute("CREATE SCHEMA IF NOT EXISTS workers")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS workers.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        done = current_version(conn)
        applied = []
        for migration in migrations():
            if migration.version <= done:
                continue
            with conn.transaction():
                conn.execute(migration.sql.encode())
                conn.execute(
                    "INSERT INTO workers.schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            applied.append(migration.version)
            log_event(Event.MIGRATION_APPLIED, {"version": migration.version, "name": migration.name})
        for queue in queues:
            ensure_queue(conn, queue)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def main(argv: list[str] | None = None) -> int:
    from backend.config import load_settings
    from backend.db.connect import connect, resolve_db_url
    from backend.dburl import secrets_of
    from backend.errors import ConfigError
    from backend.logs import add_secret, configure_logging

    parser = argparse.ArgumentParser(
        prog="python -m backend.db.migrate", description="Apply the workers schema migrations."
    )
    parser.add_argument(
        "--check", action="store_true", help="only report; exit 1 when migrations are pending"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(lenient=True)
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
        for secret in secrets_of(url):
            add_secret(secret)
        with connect(url, "dragonfly-migrate") as conn:
            if args.check:
                current, latest = current_version(conn), latest_version()
                log_event(
                    Event.MIGRATION_STATUS,
                    {"current": current, "latest": latest, "pending": latest - current},
                )
                return 0 if current >= latest else 1
            applied = apply_migrations(conn)
            log_event(
                Event.MIGRATIONS_DONE,
                {"applied": applied, "version": current_version(conn), "queues": list(QUEUES)},
            )
    except psycopg.Error as exc:
        log_event(
            Event.MIGRATION_FAILED,
            {"error": describe(exc), "error_type": type(exc).__name__},
            logging.ERROR,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
