"""External handlers: effects outside the database (a webhook, an email); receivers dedupe
by the job's idempotency key.

One message at a time is taken, leased for the visibility timeout and counted
(``read_ct``), so other replicas take the rest; the claim commits before the handler runs;
the housekeeping thread extends both leases while it runs; completion and deletion commit
together afterwards. A claim whose lease expired is taken over by the next delivery as a
new attempt.
"""

from __future__ import annotations

from typing import Any, Protocol

from backend.db import ledger
from backend.db import queries as q
from backend.jobs import Job
from backend.workers.processor import Conn, Processor, ShouldStop
from backend.workers.records import Outcome


class ExternalHandler(Protocol):
    """Effects outside the database (HTTP, email); receivers deduplicate by the job's key.
    An optional ``check(conn, job)`` reads the database first (``ExternalWorker``)."""

    def handle(self, job: Job) -> None: ...


class ExternalProcessor(Processor):
    """One message at a time, its claim committed before the handler runs."""

    def __init__(self, *, handler: ExternalHandler, **common: Any) -> None:
        super().__init__(**common)
        self.handler = handler

    def _deliver(self, conn: Conn, should_stop: ShouldStop) -> int:
        o = self.options
        messages = q.fetch_messages(
            conn,
            self.queue,
            qty=1,
            vt_s=o.visibility_timeout_s,
            max_bytes=o.max_payload_bytes,
            headers=self.headers,
        )
        if not messages:
            return 0
        self.held.take([m.msg_id for m in messages])
        self.in_flight = len(messages)
        delivery = self.sort(messages)
        if delivery.letters:
            out = Outcome(letters=delivery.letters)
            with conn.transaction():
                q.bound_transaction(conn, o.transaction_limit_ms)
                self.outcomes.settle(conn, out)
            self.outcomes.report(out)
        unstarted = self.run_alone(conn, delivery, should_stop)
        # Not started (draining): visible again now, this delivery uncounted.
        q.release_messages(conn, self.queue, unstarted)
        return len(messages)

    def _runs_together(self, msg: q.Message) -> bool:
        return False  # every job runs alone: its claim commits before its handler runs

    def _lease(self, conn: Conn, msg_id: int) -> bool:
        return True  # leased already: taken with ``fetch_messages``, invisible for the lease

    def _run_claimed(self, conn: Conn, job: Job, out: Outcome) -> bool:
        """Run the handler with its leases extended, then settle; False when another worker
        took the job over (the extension failed and the leases lapsed)."""
        self.held.hold(job.msg_id, job.idempotency_key)

        def run() -> None:
            check = getattr(self.handler, "check", None)
            if check is not None:
                with conn.transaction():
                    q.bound_transaction(conn, self.options.transaction_limit_ms)
                    check(conn, job)
            self.handler.handle(job)

        try:
            self.attempt(conn, job, out, run)
        finally:
            self.held.put_down()
        with conn.transaction():
            q.bound_transaction(conn, self.options.transaction_limit_ms)
            if not ledger.owns_claim(conn, self.queue, job.idempotency_key, self.worker_id):
                return False
            self.outcomes.settle(conn, out)
        return True
