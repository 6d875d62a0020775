"""``python -m backend.workers.outbox_processor``: delivers outbound messages
(queue ``q_outbox_processor``).

External: the claim commits first, the message is sent with the job's idempotency key
(``Idempotency-Key`` header; a Message-ID derived from it for email), and only an accepted
delivery completes the job. 4xx answers and unconfigured channels are dead-lettered;
5xx answers, timeouts and connection errors are retried.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import psycopg

from backend.domain.outbox import ENABLING_VARIABLES, OutboxConfig, check_tenant, deliver_job
from backend.events import Event
from backend.jobs import Job
from backend.logs import log_event
from backend.workers.base import ExternalWorker
from backend.workers.entry import run_worker


class OutboxWorker(ExternalWorker):
    """Sends webhook, Slack, Discord and email notifications for real."""

    name: ClassVar[str] = "outbox_processor"
    # Ride out a receiver outage of at least 10 minutes before dead-lettering: the nine
    # waits between ten attempts (5 s doubling, capped at 300 s, each jittered to half..all)
    # add up to 607.5 s at the least and 1,215 s at the most.
    defaults: ClassVar[Mapping[str, Any]] = {"WORKER_MAX_ATTEMPTS": 10, "WORKER_RETRY_BASE_S": 5.0}
    config: OutboxConfig

    def setup(self) -> None:
        self.config = OutboxConfig.from_env(os.environ)
        channels: dict[str, str] = self.config.describe()
        if not channels:  # every message would be dead-lettered: say what to set
            channels = {"fix": f"no channel is enabled: set {', '.join(ENABLING_VARIABLES)}"}
        log_event(
            Event.OUTBOX_CHANNELS,
            {"worker_id": self.worker_id, **channels},
            logging.INFO if self.config.channels else logging.WARNING,
        )

    def check(self, conn: psycopg.Connection[Any], job: Job) -> None:
        check_tenant(conn, job)

    def handle(self, job: Job) -> None:
        receipt = deliver_job(job, config=self.config)
        log_event(
            Event.OUTBOX_DELIVERED,
            {
                "job_key": job.idempotency_key,
                "msg_id": job.msg_id,
                "channel": receipt.channel,
                "destination": receipt.destination,
                "status": receipt.status,
                "message_id": receipt.message_id,
                "attempt": job.attempt,
            },
        )


if __name__ == "__main__":
    run_worker(OutboxWorker)
