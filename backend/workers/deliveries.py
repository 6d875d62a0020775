"""Recording a transactional batch's delivery before its handlers run, off the main path.

A batch holds its messages by row lock, which ends with its worker; the record in
``workers.deliveries`` outlives it, so a batch whose worker died (a job that kills the
process, a freeze, a cut) leaves a trace, and the next worker runs those messages alone.
The record has to commit while the batch's transaction is open, so it is written on a
connection of its own, by a thread of its own: the write overlaps the batch's claim and
costs the batch almost no time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import psycopg

from backend.db import queries as q

Conn = psycopg.Connection[Any]
_Write = tuple[Callable[[Conn], None], Future[None]]


class DeliveryLog:
    """Writes this worker's delivery records on its own connection and thread."""

    def __init__(self, *, queue_name: str, worker_id: str, open_conn: Callable[[], Conn]) -> None:
        self.queue_name = queue_name
        self.worker_id = worker_id
        self._open_conn = open_conn
        self._conn: Conn | None = None
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        # A daemon thread: a write stuck on a dead network never holds the process's exit.
        self._thread = threading.Thread(target=self._run, name="deliveries", daemon=True)
        self._thread.start()

    def record(self, msg_ids: Sequence[int]) -> Future[None]:
        """Start committing that these messages are about to run; wait on the result before
        running them."""
        ids = list(msg_ids)
        return self._submit(lambda conn: q.record_delivery(conn, queue=self.queue_name,
                                                           worker_id=self.worker_id, msg_ids=ids))

    def forget(self) -> Future[None]:
        """Start dropping this worker's record: its batch ended with an outcome."""
        return self._submit(lambda conn: q.forget_deliveries(conn, self.worker_id))

    def close(self) -> None:
        """Stop the thread and close the connection (unless a write is stuck on it)."""
        self._work.put(None)
        if self._lock.acquire(timeout=1.0):
            try:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            finally:
                self._lock.release()

    def _submit(self, write: Callable[[Conn], None]) -> Future[None]:
        done: Future[None] = Future()
        self._work.put((write, done))
        return done

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            write, done = item
            try:
                with self._lock:
                    if self._conn is None or self._conn.closed:
                        self._conn = self._open_conn()
                    write(self._conn)
            except Exception as exc:
                self._drop()
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _drop(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except psycopg.Error:
                    pass
                self._conn = None
