"""The heartbeat row's one writer.

Two things write the row: the housekeeping thread every interval, and every lifecycle
transition. ``write`` builds the row and upserts it under one lock, so a row built before
a transition can never land after the transition's own (a stopped worker shown RUNNING).
A transition only ``request``s a write, done by a thread of its own: the transition, its
event and a second signal after it never wait on the database, which a cut network can
hold for as long as the kernel's TCP timeouts. ``flush`` waits, bounded, for the writes
asked so far, before the pool closes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from backend.db.connect import connect
from backend.db.upkeep import upsert_heartbeat
from backend.errors import describe
from backend.events import Event
from backend.logs import log_event

_POOL_WAIT_S = 1.0  # short: on a dead network every wait delays the exit


class HeartbeatWriter:
    """Writes ``build_row()`` to ``workers.heartbeats`` through ``pool()``."""

    def __init__(
        self,
        *,
        worker_id: str,
        pool: Callable[[], ConnectionPool[Any] | None],
        build_row: Callable[[], dict[str, Any]],
    ) -> None:
        self.worker_id = worker_id
        self._pool = pool
        self._build_row = build_row
        self._lock = threading.Lock()  # one write at a time: the row built last lands last
        self._cond = threading.Condition()
        self._asked = 0  # writes requested
        self._done = 0  # requests covered by a finished write
        self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)
        self._thread.start()

    def write(self) -> None:
        """Build the row and write it now (raises the database's error)."""
        pool = self._pool()
        if pool is None:
            return
        with self._lock, pool.connection(timeout=_POOL_WAIT_S) as conn:
            upsert_heartbeat(conn, self._build_row())

    def request(self) -> None:
        """Ask for a write of the row as it will be then; returns at once."""
        with self._cond:
            self._asked += 1
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every write asked so far; whether they were done."""
        with self._cond:
            target = self._asked
            return self._cond.wait_for(lambda: self._done >= target, timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._asked > self._done)
                target = self._asked
            row_status = ""
            try:
                row_status = str(self._build_row()["status"])
                self.write()
            except Exception as exc:  # whatever it is, the writer thread must live on
                log_event(
                    Event.HEARTBEAT_FAILED,
                    {
                        "worker_id": self.worker_id,
                        "status": row_status,
                        "error": describe(exc),
                        "error_type": type(exc).__name__,
                    },
                    logging.WARNING,
                )
            with self._cond:
                self._done = target
                self._cond.notify_all()


def record_once(url: str, row: dict[str, Any]) -> bool:
    """Write one heartbeat row on a connection of its own: a boot that failed before its pool
    existed still leaves its row, so a crash loop shows. Best effort; whether it was written."""
    try:
        with connect(url, f"{row['worker_id']}:failed-boot") as conn:
            upsert_heartbeat(conn, row)
    except (psycopg.Error, OSError):
        return False
    return True
