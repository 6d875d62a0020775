"""Versioned, idempotent migrations of the ``workers`` schema (and the domain tables).

    python -m backend.db.migrate            # apply pending migrations, install pgmq, create queues
    python -m backend.db.migrate --check    # exit 1 when migrations are pending (or the
                                            # schema has a contract step this code predates)

Fit to be Railway's pre-deploy command. Safe to run from several processes at once:
an advisory lock serialises them (``migration_lock``). pgmq, the queues and the workers'
role are ``install``'s; which releases a schema still allows is ``rollbacks``'.
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

from backend.config import QUEUES, SESSION_NEEDED
from backend.db import migration_lock, rollbacks
from backend.db.install import WORKER_ROLE as WORKER_ROLE
from backend.db.install import ensure_pgmq, ensure_queue, grant_worker_role
from backend.db.migration_lock import LOCK_KEY as LOCK_KEY
from backend.db.migration_lock import LockWait
from backend.errors import ConfigError, WorkerError, describe
from backend.events import Event
from backend.logs import log_event

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


def apply_migrations(
    conn: psycopg.Connection[Any],
    queues: tuple[str, ...] = QUEUES,
    up_to: int | None = None,
    *,
    lock_wait: LockWait | None = None,
) -> list[int]:
    """Install pgmq, apply pending migrations (up to ``up_to``), create the queues; return
    the versions applied. A contract step that live older workers still need is deferred
    to a later run (``MIGRATION_DEFERRED``); the migrations after it are applied.

    Raises ``MigrationLockTimeout`` when another session holds the migrations' lock past
    ``lock_wait``, and ``ReleaseTooOld`` on a schema with a contract step this code predates."""
    conn.autocommit = True
    migration_lock.take(conn, lock_wait)
    try:
        rollbacks.refuse_predating(conn, latest_version())
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
        rollbacks.backfill_requirements(
            conn, {m.version: m.after_workers_at for m in migrations() if m.after_workers_at is not None}
        )
        for queue in queues:
            ensure_queue(conn, queue)
        grant_worker_role(conn, queues)
        return applied
    finally:
        migration_lock.release(conn)


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
    if migration.outside_transaction:
        _drop_invalid_indexes(conn)
        for statement in migration.statements():
            conn.execute(statement.encode())
        _record(conn, migration)
        return
    with conn.transaction():
        conn.execute(migration.sql.encode())
        _record(conn, migration)


def _record(conn: psycopg.Connection[Any], migration: Migration) -> None:
    """Record the migration as applied; a contract step with what it requires, in the same
    transaction, so that no older release boots on it unwarned."""
    if rollbacks.records_requirements(conn):
        conn.execute(
            "INSERT INTO workers.schema_migrations (version, name, requires_schema) VALUES (%s, %s, %s)",
            (migration.version, migration.name, migration.after_workers_at),
        )
    else:
        conn.execute(
            "INSERT INTO workers.schema_migrations (version, name) VALUES (%s, %s)",
            (migration.version, migration.name),
        )


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
        "--check",
        action="store_true",
        help="only report; exit 1 when migrations are pending or this release predates the schema",
    )
    args = parser.parse_args(argv)
    url_variable = migration_url_variable(os.environ)
    try:
        settings = load_settings(lenient=True, url_variable=url_variable)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    configure_logging(settings.log_level, secrets=secrets_of(settings.db_url))
    if settings.uses_transaction_pooler:
        print(f"configuration error: {ConfigError(url_variable, SESSION_NEEDED)}", file=sys.stderr)
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
                rollbacks.refuse_predating(conn, latest_version())
                pending = pending_versions(conn)
                log_event(
                    Event.MIGRATION_STATUS,
                    {"current": current_version(conn), "latest": latest_version(), "pending": pending},
                )
                return 1 if pending else 0
            applied = apply_migrations(conn, lock_wait=LockWait(timeout_s=settings.migration_lock_timeout_s))
            log_event(
                Event.MIGRATIONS_DONE,
                {"applied": applied, "version": current_version(conn), "queues": list(QUEUES)},
            )
    except (psycopg.Error, WorkerError) as exc:  # the database, the lock, a rollback refused
        log_event(
            Event.MIGRATION_FAILED,
            {"error": describe(exc), "error_type": type(exc).__name__},
            logging.ERROR,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
