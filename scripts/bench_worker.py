"""A no-op transactional worker on queue ``q_bench``, the subject of ``python -m scripts.bench``.

    python -m scripts.bench_worker

Its handler writes nothing, so a run measures the runtime alone: read the batch, claim the
keys in the ledger, mark them completed, delete the messages, commit.

A job whose payload carries ``sent`` (the enqueuer's ``time.time()``) reports its pickup
latency, handler start minus send time, in a ``BENCH_PICKUP`` log line. The clock is read
first thing in the handler; the line is written after it, so it delays nothing it measures.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import psycopg

from backend.jobs import Job
from backend.logs import log_worker_event
from backend.workers.base import TransactionalWorker
from backend.workers.entry import run_worker

PICKUP_EVENT = "BENCH_PICKUP"


class BenchWorker(TransactionalWorker):
    """Does nothing per job, except report the pickup latency of latency probes."""

    name: ClassVar[str] = "bench"

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None:
        started = time.time()
        sent = job.payload.get("sent")
        if sent is not None:
            log_worker_event(
                PICKUP_EVENT,
                {"latency_ms": round((started - float(sent)) * 1000, 3), "job_key": job.idempotency_key},
            )


if __name__ == "__main__":
    run_worker(BenchWorker)
