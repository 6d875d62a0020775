"""A worker for testing the runtime as a process: its behaviour is driven by each job's payload.

    PROBE_KIND=transactional|external python -m tests.workers.probe

Payload keys: ``sleep_s`` (pause inside the handler, after the effect is written),
``busy_s`` (transactional: keep the transaction busy that long, one short statement after
another), ``fail_times`` (raise on the first N attempts), ``permanent`` (raise
PermanentJobError), ``rss_mb`` (allocate that much and keep it), ``exit_code`` (end the
process at once with ``os._exit``, as a crashing extension or the OOM killer would), ``hang``
(never return, after the effect is written: ``loop``, a Python loop of short sleeps, which
an interrupt stops; ``recv``, a socket read with no timeout, blocked in C, which it does
not), ``sys_exit`` (call ``sys.exit`` with that code, as a library giving up would),
``memory_error`` (raise ``MemoryError``).
Effects:
- transactional: a row in ``probe.effects`` written on the job's own connection;
- external: a call to a receiver that deduplicates by idempotency key
  (``probe.receiver``, written on a separate autocommit connection, like a remote system).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any, ClassVar

import psycopg

from backend.db.connect import resolve_db_url
from backend.errors import PermanentJobError
from backend.jobs import Job
from backend.logs import log_worker_event
from backend.workers.base import ExternalWorker, TransactionalWorker
from backend.workers.entry import run_worker

_HOG: list[bytes] = []

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS probe;
CREATE TABLE IF NOT EXISTS probe.effects (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_key text NOT NULL, worker_id text NOT NULL, attempt int NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS probe.receiver (
    job_key text PRIMARY KEY, calls int NOT NULL DEFAULT 1,
    first_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS probe.attempts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_key text NOT NULL, attempt int NOT NULL, worker_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
"""


def _behave(job: Job, worker_id: str, note: psycopg.Connection[Any]) -> None:
    p = job.payload
    note.execute(
        "INSERT INTO probe.attempts (job_key, attempt, worker_id) VALUES (%s, %s, %s)",
        (job.idempotency_key, job.attempt, worker_id),
    )
    if p.get("permanent"):
        raise PermanentJobError(f"probe: permanent failure of {job.idempotency_key}")
    if job.attempt <= int(p.get("fail_times", 0)):
        raise RuntimeError(f"probe: planned failure {job.attempt} of {p['fail_times']}")
    if p.get("memory_error"):
        raise MemoryError("probe: out of memory")
    if p.get("sys_exit") is not None:
        sys.exit(int(p["sys_exit"]))
    if p.get("exit_code") is not None:
        log_worker_event("PROBE_EXITING", {"job_key": job.idempotency_key, "attempt": job.attempt})
        logging.shutdown()
        os._exit(int(p["exit_code"]))
    if p.get("rss_mb"):
        _HOG.append(b"\x01" * (int(p["rss_mb"]) * 1024 * 1024))  # touched, so resident


def _busy(job: Job, conn: psycopg.Connection[Any]) -> None:
    until = time.monotonic() + float(job.payload.get("busy_s", 0))
    while time.monotonic() < until:
        conn.execute("SELECT pg_sleep(0.1)")


def _hang(job: Job, worker_id: str) -> None:
    how = job.payload.get("hang")
    if not how:
        return
    log_worker_event("PROBE_HANGING", {"job_key": job.idempotency_key, "attempt": job.attempt, "how": how})
    if how == "recv":
        reader, _writer = socket.socketpair()
        reader.recv(1)  # nothing is ever written: blocked in C, with no timeout
    while True:
        time.sleep(0.05)


def _pause(job: Job, worker_id: str) -> None:
    if job.payload.get("sleep_s"):
        log_worker_event(
            "PROBE_IN_HANDLER",
            {"job_key": job.idempotency_key, "worker_id": worker_id, "attempt": job.attempt},
        )
        time.sleep(float(job.payload["sleep_s"]))


class _Notes:
    """A separate autocommit connection: attempts are recorded even when a job rolls back."""

    def __init__(self) -> None:
        self._conn: psycopg.Connection[Any] | None = None

    def conn(self, settings: Any) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(resolve_db_url(settings), autocommit=True)
        return self._conn


class ProbeTransactional(TransactionalWorker):
    name: ClassVar[str] = os.environ.get("PROBE_NAME", "probe")
    notes = _Notes()

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None:
        _behave(job, self.worker_id, self.notes.conn(self.settings))
        conn.execute(
            "INSERT INTO probe.effects (job_key, worker_id, attempt) VALUES (%s, %s, %s)",
            (job.idempotency_key, self.worker_id, job.attempt),
        )
        _busy(job, conn)
        _pause(job, self.worker_id)
        _hang(job, self.worker_id)


class ProbeExternal(ExternalWorker):
    name: ClassVar[str] = os.environ.get("PROBE_NAME", "probe")
    notes = _Notes()

    def handle(self, job: Job) -> None:
        note = self.notes.conn(self.settings)
        _behave(job, self.worker_id, note)
        note.execute(
            "INSERT INTO probe.receiver (job_key) VALUES (%s) ON CONFLICT (job_key)"
            " DO UPDATE SET calls = probe.receiver.calls + 1",
            (job.idempotency_key,),
        )
        _pause(job, self.worker_id)
        _hang(job, self.worker_id)


if __name__ == "__main__":
    run_worker(ProbeExternal if os.environ.get("PROBE_KIND") == "external" else ProbeTransactional)
