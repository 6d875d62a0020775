"""The chaos run's own transactional worker, on queue ``q_chaos_worker``.

    python -m scripts.chaos_worker

Each job writes one row to ``chaos.worker_effects`` on the job's own connection (so a row
exists once per committed effect), and a job whose payload carries ``exit_code`` ends the
process at once with ``os._exit``, as a crashing C extension or the OOM killer would. The
Dragonfly workers have no such job; this one lets the chaos run prove that a job that
kills its worker is isolated and dead-lettered while the rest of its batch completes.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

import psycopg

from backend.jobs import Job
from backend.logs import log_worker_event
from backend.workers.base import TransactionalWorker
from backend.workers.entry import run_worker

EXIT_EVENT = "CHAOS_JOB_EXIT"


class ChaosWorker(TransactionalWorker):
    """Writes an effect per job; ends its process on a job that says so."""

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


if __name__ == "__main__":
    run_worker(ChaosWorker)
