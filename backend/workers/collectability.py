"""``python -m backend.workers.collectability``: scores judgments (queue ``q_collectability``).

A job is ``entity_type: "judgment"``, ``entity_id``: the judgment's id. Transactional: the
score is stored in the job's own transaction, a whole batch in two statements.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import psycopg

from backend.domain.collectability import score_and_store
from backend.errors import PermanentJobError
from backend.workers.base import TransactionalWorker
from backend.workers.entry import run_worker
from backend.workers.jobs import Job


def entity_id(job: Job, entity_type: str) -> int:
    """The job's entity id as an integer key, or a permanent error saying what is wrong."""
    if job.entity_type != entity_type:
        raise PermanentJobError(f"expected entity_type {entity_type!r}, got {job.entity_type!r}")
    try:
        return int(job.entity_id)
    except ValueError:
        raise PermanentJobError(f"entity_id must be an integer id, got {job.entity_id!r}") from None


class CollectabilityWorker(TransactionalWorker):
    """Computes and stores each judgment's collectability score, tier and reason."""

    name: ClassVar[str] = "collectability"

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None:
        self.handle_batch(conn, [job])

    def handle_batch(self, conn: psycopg.Connection[Any], jobs: list[Job]) -> None:
        ids = [entity_id(job, "judgment") for job in jobs]
        score_and_store(conn, ids, [job.idempotency_key for job in jobs], today=datetime.now(UTC).date())


if __name__ == "__main__":
    run_worker(CollectabilityWorker)
