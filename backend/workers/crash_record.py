"""The crash record of a transactional batch: its delivery, committed before its handlers
run, off the main path.

A batch holds its messages by row lock, which ends with its worker; the record in
``workers.deliveries`` outlives it, so a batch whose worker died (a job that kills the
process, a freeze, a cut) leaves a trace, and the next worker runs those messages alone.
The record has to commit while the batch's transaction is open, so it is written on a
connection of its own, with libpq's asynchronous calls: sent before the batch claims its
keys, its commit confirmed after, so the two round trips overlap.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import pq

from backend.db import queries as q

Conn = psycopg.Connection[Any]


class DeliveryLog:
    """This worker's delivery records (``workers.deliveries``), on a connection of its own."""

    def __init__(self, *, queue_name: str, worker_id: str, open_conn: Callable[[], Conn]) -> None:
        self.queue_name = queue_name
        self.worker_id = worker_id
        self._open_conn = open_conn
        self._conn: Conn | None = None
        self._pending = False

    def record(self, msg_ids: Sequence[int]) -> None:
        """Send the record of the messages about to run; ``confirm`` before running them."""
        self._send(
            q.RECORD_DELIVERY,
            [self.worker_id.encode(), self.queue_name.encode(), q.int_array(msg_ids).encode()],
        )

    def forget(self, timeout_s: float) -> None:
        """Drop this worker's record (its batch ended with an outcome), and wait for it."""
        self._send(q.FORGET_DELIVERIES, [self.worker_id.encode()])
        self.confirm(timeout_s)

    def forget_quietly(self, timeout_s: float) -> None:
        """``forget`` at a clean stop: best effort, since a record left behind only makes
        the retries of its messages run alone."""
        try:
            self.forget(timeout_s)
        except (psycopg.Error, OSError):
            pass

    def confirm(self, timeout_s: float) -> None:
        """Wait for the record sent last to commit; raise ``OperationalError`` when it did not
        within ``timeout_s`` (the connection is then dropped and opened anew next time)."""
        if not self._pending:
            return
        self._pending = False
        conn = self._conn
        assert conn is not None
        try:
            _wait_for_result(conn.pgconn, timeout_s)
            failure = None
            while (result := conn.pgconn.get_result()) is not None:
                if result.status != pq.ExecStatus.COMMAND_OK and failure is None:
                    failure = (result.error_message or b"").decode(errors="replace")
        except psycopg.OperationalError:
            self._drop()
            raise
        if failure is not None:
            self._drop()
            raise psycopg.OperationalError(f"recording a delivery failed: {' '.join(failure.split())}")

    def close(self) -> None:
        self._drop()

    def _send(self, sql: bytes, params: list[bytes]) -> None:
        if self._pending:  # the previous record was never confirmed: its batch failed
            self._drop()
        if self._conn is None or self._conn.closed:
            self._conn = self._open_conn()
        try:
            self._conn.pgconn.send_query_params(sql, params)
        except psycopg.OperationalError:
            self._drop()
            raise
        self._pending = True

    def _drop(self) -> None:
        self._pending = False
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None


def _wait_for_result(pgconn: pq.abc.PGconn, timeout_s: float) -> None:
    """Until the result is in (``consume_input`` raises ``OperationalError`` on a lost
    connection), or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    pgconn.consume_input()
    while pgconn.is_busy():
        left = deadline - time.monotonic()
        if left <= 0:
            raise psycopg.OperationalError(f"the delivery record did not commit within {timeout_s:g} s")
        select.select([pgconn.socket], [], [], left)
        pgconn.consume_input()
