"""The chaos run's own workers: a transactional one on queue ``q_chaos_worker`` and an
external one on ``q_chaos_external``.

    python -m scripts.chaos.worker                                  # transactional
    CHAOS_WORKER_KIND=external CHAOS_RECEIVER_URL=http://... python -m scripts.chaos.worker

The transactional worker writes one row to ``chaos.worker_effects`` per job on the job's
own connection (so a row exists once per committed effect). The external one, like the
outbox, sends each job to a receiver (``CHAOS_RECEIVER_URL``, the chaos run's HTTP
recorder) with its ``Idempotency-Key``, by which the receiver deduplicates.

Payloads the Dragonfly workers never get, so that the chaos run can prove what the runtime
does with such jobs: ``exit_code`` ends the process at once with ``os._exit``, as a crashing
C extension or the OOM killer would (the job is isolated and dead-lettered while the rest
of its batch completes); ``hang``, after the effect is written or sent, never returns:
``loop``, a Python loop of short sleeps, which the deadline interrupts, or ``recv``, a
socket read with no timeout, blocked in C, which it cannot interrupt (the worker records
the attempt and exits 1). Either way the job is dead-lettered ``JobTimedOut``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.request
from typing import Any, ClassVar

import psycopg

from backend.errors import ConfigError
from backend.jobs import Job
from backend.logs import log_worker_event
from backend.workers.base import ExternalWorker, TransactionalWorker
from backend.workers.entry import run_worker

EXIT_EVENT = "CHAOS_JOB_EXIT"
HANG_EVENT = "CHAOS_JOB_HANG"
KIND_VARIABLE, URL_VARIABLE = "CHAOS_WORKER_KIND", "CHAOS_RECEIVER_URL"


def _hang(job: Job) -> None:
    how = job.payload.get("hang")
    if not how:
        return
    log_worker_event(HANG_EVENT, {"job_key": job.idempotency_key, "attempt": job.attempt, "how": how})
    if how == "recv":
        reader, _writer = socket.socketpair()
        reader.recv(1)  # nothing is ever written: blocked in C, with no timeout
    while True:
        time.sleep(0.05)


class ChaosWorker(TransactionalWorker):
    """Writes an effect per job; ends its process, or hangs, on a job that says so."""

    name: ClassVar[str] = "chaos_worker"

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None:
        conn.execute(
            "INSERT INTO chaos.worker_effects (job_key, attempt) VALUES (%s, %s)",
            (job.idempotency_key, job.attempt),
        )
        if job.payload.get("exit_code") is not None:
            log_worker_event(EXIT_EVENT, {"job_key": job.idempotency_key, "attempt": job.attempt})
            logging.shutdown()
            os._exit(int(job.payload["exit_code"]))
        _hang(job)


class ChaosExternal(ExternalWorker):
    """Sends each job to the receiver with its key, as the outbox does; hangs on a job that
    says so, after sending it."""

    name: ClassVar[str] = "chaos_external"
    url: str

    def setup(self) -> None:
        url = os.environ.get(URL_VARIABLE, "")
        if not url.startswith("http://"):
            raise ConfigError(URL_VARIABLE, "set it to the receiver's http:// URL")
        self.url = url

    def handle(self, job: Job) -> None:
        request = urllib.request.Request(
            self.url,
            data=json.dumps({"key": job.idempotency_key, "attempt": job.attempt}).encode(),
            headers={"Idempotency-Key": job.idempotency_key, "Content-Type": "application/json"},
            method="POST",
        )
        # Shorter than the deadline: a receiver that does not answer fails the attempt.
        with urllib.request.urlopen(request, timeout=0.8 * self.settings.job_timeout_s) as reply:
            reply.read()  # a refusal (4xx, 5xx) raises: the attempt fails and is retried
        _hang(job)


if __name__ == "__main__":
    run_worker(ChaosExternal if os.environ.get(KIND_VARIABLE) == "external" else ChaosWorker)
