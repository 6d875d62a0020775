"""``python -m backend.workers.collectability``: scores judgments (queue ``q_collectability``).

A job is ``entity_type: "judgment"``, ``entity_id``: the judgment's id. Transactional: the
score is stored in the job's own transaction, a whole batch in two statements.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import psycopg

from backend.domain.collectability import score_and_store
from backend.jobs import Job
from backend.workers.base import TransactionalWorker
from backend.workers.entry import run_worker


class CollectabilityWorker(TransactionalWorker):
    """Computes and stores each judgment's collectability score, tier and reason."""

    name: ClassVar[str] = "collectability"

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None:
        self.handle_batch(conn, [job])

    def handle_batch(self, conn: psycopg.Connection[Any], jobs: list[Job]) -> None:
        ids = [job.integer_entity_id("judgment") for job in jobs]
        score_and_store(
            conn,
            ids,
            [job.idempotency_key for job in jobs],
            today=datetime.now(UTC).date(),
            org_ids=[job.org_id for job in jobs],
        )


if __name__ == "__main__":
    run_worker(CollectabilityWorker)
