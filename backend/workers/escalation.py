"""``python -m backend.workers.escalation``: recommends a case's next enforcement action
(queue ``q_escalation``).

A job is ``entity_type: "enforcement_case"``, ``entity_id``: the case's id; the payload
may name ``notify_channel`` (and ``notify_to`` for email). Transactional: the
recommendation event and its outbox notification commit with the job, or neither does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import psycopg

from backend.domain.escalation import load_case_facts, notify_route, recommend, record_recommendation
from backend.errors import TenantMismatch
from backend.jobs import Job
from backend.workers.base import TransactionalWorker
from backend.workers.entry import run_worker


class EscalationWorker(TransactionalWorker):
    """Weighs a case's facts, records the recommendation and enqueues its notification."""

    name: ClassVar[str] = "escalation"

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None:
        case_id = job.integer_entity_id("enforcement_case")
        route = notify_route(job.payload)
        facts = load_case_facts(conn, case_id)
        if facts.org_id != job.org_id:
            raise TenantMismatch(
                f"enforcement case {case_id} belongs to another organisation than the job's org_id"
            )
        recommendation = recommend(facts)
        record_recommendation(conn, case_id, recommendation, job.idempotency_key, route=route)


if __name__ == "__main__":
    run_worker(EscalationWorker)
