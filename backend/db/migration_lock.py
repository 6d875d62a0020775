"""The migrations' advisory lock: taken by polling, never waited for in silence, and given
up after a bound with the session that holds it and what to do about it.

A session that holds the lock shows in ``pg_locks`` as an ``advisory`` lock whose bigint
key is split in two: ``classid`` its high 32 bits, ``objid`` its low 32 bits, and
``objsubid`` 1 (the bigint form).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row

from backend.config import DEFAULTS
from backend.db import locks
from backend.errors import BootError
from backend.events import Event
from backend.logs import log_event

LOCK_KEY = locks.MIGRATIONS
TIMEOUT_VARIABLE = "WORKER_MIGRATION_LOCK_TIMEOUT_S"

_HOLDER = """
SELECT a.pid, a.application_name, a.state, a.backend_start, a.state_change
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid::bigint = %(key)s::bigint >> 32
   AND l.objid::bigint = %(key)s::bigint & 4294967295
 LIMIT 1
"""


class MigrationLockTimeout(BootError):
    """Another session held the migrations' lock for longer than the wait allows."""


@dataclass(frozen=True, kw_only=True)
class LockWait:
    """How long to wait for the lock (``variable`` is the setting that says so, named when
    the wait gives up), and how often to say who holds it meanwhile."""

    timeout_s: float = DEFAULTS[TIMEOUT_VARIABLE]
    variable: str = TIMEOUT_VARIABLE
    first_notice_s: float = 2.0
    notice_every_s: float = 5.0
    poll_s: float = 0.2


@dataclass(frozen=True, kw_only=True)
class Holder:
    """The session holding the lock, as ``pg_stat_activity`` shows it."""

    pid: int
    application_name: str | None
    state: str | None
    backend_start: datetime | None
    state_change: datetime | None

    def fields(self) -> dict[str, Any]:
        return {
            "holder_pid": self.pid,
            "holder_application_name": self.application_name,
            "holder_state": self.state,
            "holder_backend_start": _iso(self.backend_start),
            "holder_state_change": _iso(self.state_change),
        }

    def told(self) -> str:
        since = f", {self.state} since {_iso(self.state_change)}" if self.state else ""
        return (
            f"pid {self.pid} (application_name {self.application_name or ''!r},"
            f" connected since {_iso(self.backend_start)}{since})"
        )

    def fix(self) -> str:
        return (
            "if no other deploy's migrate (or dev worker's boot) is running, end that session:"
            f" SELECT pg_terminate_backend({self.pid}); if one is, wait for it to finish"
        )


def lock_holder(conn: psycopg.Connection[Any], key: int = LOCK_KEY) -> Holder | None:
    """The session holding the advisory lock ``key`` in this database, if any is seen."""
    row = conn.cursor(row_factory=dict_row).execute(_HOLDER, {"key": key}).fetchone()
    return None if row is None else Holder(**row)


def take(conn: psycopg.Connection[Any], wait: LockWait | None = None) -> None:
    """Take the migrations' lock, or raise ``MigrationLockTimeout`` after ``wait.timeout_s``.

    By polling, never by waiting in one statement: a session blocked in pg_advisory_lock
    holds a snapshot that another service's CREATE INDEX CONCURRENTLY would wait for while
    that service holds the lock (a deadlock). ``MIGRATION_WAITING`` names the holder after
    ``first_notice_s`` and every ``notice_every_s`` after that."""
    wait = wait or LockWait()
    started = time.monotonic()
    notice_at = started + wait.first_notice_s
    while not _try(conn):
        now = time.monotonic()
        if now - started >= wait.timeout_s:
            raise MigrationLockTimeout(_gave_up(lock_holder(conn), now - started, wait))
        if now >= notice_at:
            _say_waiting(lock_holder(conn), now - started, wait)
            notice_at = now + wait.notice_every_s
        time.sleep(max(0.0, min(wait.poll_s, started + wait.timeout_s - now)))


def release(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def _try(conn: psycopg.Connection[Any]) -> bool:
    cursor = conn.cursor(row_factory=tuple_row)
    row = cursor.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
    return bool(row and row[0])


def _say_waiting(holder: Holder | None, waited_s: float, wait: LockWait) -> None:
    data: dict[str, Any] = {"waited_s": round(waited_s, 1), "timeout_s": wait.timeout_s}
    if holder is None:  # it ended between the try and this look: the next try gets the lock
        data["fix"] = "the holder has just let go"
    else:
        data.update(holder.fields(), fix=holder.fix())
    log_event(Event.MIGRATION_WAITING, data, logging.WARNING)


def _gave_up(holder: Holder | None, waited_s: float, wait: LockWait) -> str:
    bound = f"gave up after {waited_s:.0f} s ({wait.variable}={wait.timeout_s:g})"
    if holder is None:
        return f"the migrations' lock was held by another session; {bound}: it has just let go, try again"
    return f"the migrations' lock is held by {holder.told()}; {bound}: {holder.fix()}"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")
