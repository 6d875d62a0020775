"""The fetch loop: one delivery after another, waiting for work when the queue is empty,
and riding out database outages.

The ``Consumer`` owns the loop's connection (LISTEN on the queue's insert channel when
notifications are on), reconnects with ``backend.db.connect.outage_retrying`` and reports
``DB_OUTAGE`` / ``DB_RECOVERED``. A transaction the server ended past its bound is
``TRANSACTION_TIMED_OUT``: the connection is replaced and the loop goes on.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from tenacity import RetryError

from backend.backoff import backoff_s
from backend.config import Settings
from backend.db import queries as q
from backend.db.connect import DB_ERRORS, outage_retrying
from backend.errors import describe
from backend.events import Event
from backend.logs import log_event
from backend.workers.deadline import Call
from backend.workers.processor import Processor

Conn = psycopg.Connection[Any]
_ACQUIRE_TIMEOUT_S = 2.0  # short: during an outage every wait delays a SIGTERM's exit
# idle_in_transaction_session_timeout and statement_timeout: the bounds every transaction
# of the runtime sets (queries.bound_transaction).
_BOUND_SQLSTATES = frozenset({"25P03", "57014"})
_DB_ERROR_TYPES: tuple[type[BaseException], ...] = (RetryError, *DB_ERRORS)


class Consumer:
    """Runs ``processor.process`` until ``stopping`` is set."""

    def __init__(self, *, processor: Processor, settings: Settings, stopping: threading.Event) -> None:
        self.processor = processor
        self.settings = settings
        self.stopping = stopping
        self.queue = processor.queue
        self.worker_id = processor.worker_id
        self.pool: ConnectionPool[Any] | None = None
        self.notifications = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)

    def wake(self) -> None:
        """Cut an idle wait short (a stop was requested)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def run(self, pool: ConnectionPool[Any], *, notifications: bool) -> None:
        """Process deliveries until a stop is requested; outages are waited out here."""
        self.pool, self.notifications = pool, notifications
        conn: Conn | None = None
        outage_since: float | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = self._acquire()
                read = self.processor.process(conn, self.stopping.is_set)
                if outage_since is not None:
                    log_event(
                        Event.DB_RECOVERED,
                        {"worker_id": self.worker_id, "outage_s": round(time.monotonic() - outage_since, 3)},
                    )
                    outage_since = None
                if read == 0:
                    self._wait_for_work(conn)
                elif self.notifications:
                    _forget_notifications(conn)
            except BaseException as exc:
                if (call := self.processor.deadline.take_expired()) is not None:
                    self._after_deadline(conn, call)
                    conn = None
                    continue
                if not isinstance(exc, psycopg.Error):
                    raise
                if not isinstance(exc, DB_ERRORS) and not (conn is not None and conn.broken):
                    raise
                if exc.sqlstate in _BOUND_SQLSTATES:
                    self._log_bound_exceeded(exc)
                    self._give_back(conn)
                    conn = None
                    continue
                if outage_since is None:
                    outage_since = time.monotonic()
                    failures = 0
                    log_event(
                        Event.DB_OUTAGE,
                        {
                            "worker_id": self.worker_id,
                            "error": describe(exc),
                            "error_type": type(exc).__name__,
                        },
                        logging.ERROR,
                    )
                else:
                    # It answered again but failed again: keep backing off, never spin.
                    failures += 1
                    self._back_off(failures, exc)
                self._give_back(conn)
                conn = self._reconnect()
        self._give_back(conn)

    def _after_deadline(self, conn: Conn | None, call: Call) -> None:
        """A handler interrupted at its deadline: the interrupt may have landed anywhere in
        its use of the connection, so the connection is closed (the server rolls back its
        transaction) and replaced, and the attempt recorded on another."""
        if conn is not None:
            conn.close()
            self._give_back(conn)  # the pool drops a closed connection
        assert self.pool is not None
        pool = self.pool
        self.processor.record_timeout(
            lambda: pool.connection(timeout=_ACQUIRE_TIMEOUT_S), call, interrupted=True
        )

    def _log_bound_exceeded(self, exc: psycopg.Error) -> None:
        """The server ended this worker's transaction: it paused (a frozen process, a cut
        network, a handler busy outside the database) or ran one statement longer than the
        visibility timeout. Its locks went with it; its messages were delivered again."""
        log_event(
            Event.TRANSACTION_TIMED_OUT,
            {
                "worker_id": self.worker_id,
                "queue": self.queue,
                "error": describe(exc),
                "error_type": type(exc).__name__,
                "limit_s": self.settings.visibility_timeout_s,
                "consequence": "rolled back; the jobs are delivered again, each run counted",
                "fix": "if a handler needs longer, raise WORKER_VISIBILITY_TIMEOUT_S",
            },
            logging.ERROR,
        )

    def _back_off(self, failures: int, exc: BaseException) -> None:
        delay = backoff_s(failures + 1, base_s=0.25, max_s=10.0)
        log_event(
            Event.DB_RETRY,
            {
                "attempt": failures,
                "delay_s": round(delay, 3),
                "error": describe(exc),
                "error_type": type(exc).__name__,
            },
            logging.WARNING,
        )
        self.stopping.wait(delay)

    def _acquire(self) -> Conn:
        """A pooled connection for the loop, listening when notifications are on, and
        known to answer; on any failure it goes back to the pool (which drops it if broken)."""
        assert self.pool is not None
        conn: Conn = self.pool.getconn(timeout=_ACQUIRE_TIMEOUT_S)
        try:
            if self.notifications:
                conn.execute(f'LISTEN "{q.notify_channel(self.queue)}"')
            if q.read_only(conn):
                raise psycopg.errors.ReadOnlySqlTransaction(
                    "the database is read-only (a failover to a standby, or a full disk)"
                )
        except BaseException:
            self.pool.putconn(conn)
            raise
        return conn

    def _give_back(self, conn: Conn | None) -> None:
        """Return the loop's connection to the pool, whatever state it is in."""
        if conn is None or self.pool is None:
            return
        try:
            if self.notifications and not conn.broken and not conn.closed:
                conn.execute("UNLISTEN *")
        except psycopg.Error:
            pass
        finally:
            self.pool.putconn(conn)

    def _reconnect(self) -> Conn | None:
        """Retry until the database answers, or return None when asked to stop."""
        try:
            for attempt in outage_retrying(self.stopping):
                with attempt:
                    return self._acquire()
        except _DB_ERROR_TYPES:
            pass
        return None

    def _wait_for_work(self, conn: Conn) -> None:
        """Idle until a message may be visible: notified, or seen by a one-statement check.

        The check costs one statement per poll (or per ``notify_wait_s`` with notifications)
        instead of the three of an empty batch transaction; it also catches retries whose
        delay ends, which no insert notification announces, and gives back the claims of
        workers whose process is gone (``Processor.has_work``).
        """
        while not self.stopping.is_set():
            if self._idle(conn) or self.processor.has_work(conn):
                return

    def _idle(self, conn: Conn) -> bool:
        """Wait for an insert notification (True), the poll interval or a stop (False)."""
        if not self.notifications:
            self.stopping.wait(self.settings.poll_interval_s)
            return False
        if any(True for _ in conn.notifies(timeout=0)):
            return True
        wake = self._wake_r.fileno()
        ready, _, _ = select.select([conn.fileno(), wake], [], [], self.settings.notify_wait_s)
        if wake in ready:
            self._wake_r.recv(64)
            return False
        return conn.fileno() in ready and any(True for _ in conn.notifies(timeout=0))


def _forget_notifications(conn: Conn) -> None:
    """While busy, notifications pile up unread; the queue is read anyway."""
    for _ in conn.notifies(timeout=0):
        pass
