"""Transactional handlers: effects that are database writes, made in the claim's transaction.

One transaction per batch locks the messages (the row locks are the lease: every reader
skips locked rows, and they end with the transaction, so with the worker), claims their
keys in the ledger as completed and deletes the claimed messages in one statement, and runs
the handler on the same connection. Before the handlers run, the batch's message ids are
committed to ``workers.deliveries`` on another connection (the crash record,
``DeliveryLog``, overlapping the claim): a batch whose worker dies (a job that kills the
process, a freeze, a cut) leaves that record, and the next worker to lock one of its
messages runs it alone (``Processor.run_alone``).
When a handler raises inside a batch, the batch rolls back and the next one runs its jobs
one by one, each in a savepoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import psycopg

from backend.db import ledger
from backend.db import queries as q
from backend.db.ledger import LedgerStatus
from backend.errors import describe
from backend.events import Event
from backend.jobs import Job
from backend.logs import log_event
from backend.workers.crash_record import DeliveryLog
from backend.workers.processor import HANDLER_ERRORS, Conn, Processor, ShouldStop, reraise_if_connection_lost
from backend.workers.records import Delivery, Outcome, Pending

# Claims of transactional jobs are written as completed; a batch whose handlers ran longer
# than this rewrites completed_at, so the ledger's time stays within it of the truth.
_STALE_COMPLETION_S = 1.0


class TransactionalHandler(Protocol):
    """Database-only effects, run on the worker's connection inside the claim's transaction.

    ``handle_batch`` receives every job of a batch at once (set-based SQL); when it raises,
    the runtime rolls back and runs the jobs one by one through ``handle``.
    """

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None: ...

    def handle_batch(self, conn: psycopg.Connection[Any], jobs: list[Job]) -> None: ...


class _BatchFailed(Exception):
    """A handler raised inside an optimistic batch: roll it back, redo it one by one."""


class TransactionalProcessor(Processor):
    """Batches in one transaction each; jobs delivered before run alone after it."""

    def __init__(self, *, handler: TransactionalHandler, deliveries: DeliveryLog, **common: Any) -> None:
        super().__init__(**common)
        self.handler = handler
        self.deliveries = deliveries
        self._one_by_one = False  # the last batch failed: run the next one job by job

    def _deliver(self, conn: Conn, should_stop: ShouldStop) -> int:
        o = self.options
        out = Outcome()
        try:
            # Not pipelined with BEGIN: a statement sent in pipeline mode leaves the session
            # "active" until a Sync, and the idle-in-transaction bound never starts.
            with conn.transaction():
                messages = q.lock_messages(
                    conn,
                    self.queue,
                    qty=o.batch_size,
                    max_bytes=o.max_payload_bytes,
                    limit_ms=o.transaction_limit_ms,
                    headers=self.headers,
                )
                if not messages:
                    return 0
                self.in_flight = len(messages)
                delivery = self.sort(messages)
                out.letters.extend(delivery.letters)
                self._batch(conn, delivery, out)
        except _BatchFailed:
            self._one_by_one = True
            # Rolled back by this worker, nothing lost: not a delivery that left no outcome.
            self.deliveries.forget(o.visibility_timeout_s)
            return len(messages)
        self._one_by_one = False
        self.outcomes.report(out)
        if delivery.copies:
            for p in delivery.together:  # their copies were deleted or delayed with them
                delivery.copies.pop(p.key, None)
        self.run_alone(conn, delivery, should_stop)
        return len(messages)

    def _runs_together(self, msg: q.Message) -> bool:
        return not msg.delivered_before

    def _batch(self, conn: Conn, delivery: Delivery, out: Outcome) -> None:
        """Inside the batch's transaction: record the delivery, claim (as completed, the
        claimed messages deleted with it), handle, settle. Optimistic: the handler gets the
        whole batch; when it raises, the transaction rolls back and the next batch runs one
        by one."""
        recorded = bool(delivery.together)
        if recorded:
            # The jobs to run alone after it stay recorded too: this record replaces the
            # last, and a batch that never commits must not erase their mark.
            self.deliveries.record([p.msg_id for p in (*delivery.together, *delivery.alone)])
        expired: list[Pending] = []
        # Optimistic: the claimed jobs' messages go with their claim (a handler that raises
        # rolls both back); one by one, a job that fails keeps its message for its retry.
        together = not self._one_by_one
        claims = self.claim(
            conn,
            delivery.together,
            out,
            status=LedgerStatus.COMPLETED,
            expired=expired,
            delete_claimed=together,
        )
        if expired:  # after the commit, alone, their copies with them
            delivery.alone.extend(expired)
            delivery.together = [p for p in delivery.together if p not in expired]
        if recorded:
            self.deliveries.confirm(self.options.visibility_timeout_s)  # before any handler runs
        started = time.monotonic()
        if not together:
            self._run_one_by_one(conn, claims.jobs, out)
        elif claims.jobs:
            self._run_batch(conn, claims.jobs)
            out.done.extend(claims.jobs)
        if out.done and time.monotonic() - started > _STALE_COMPLETION_S:
            ledger.complete(conn, self.queue, [j.idempotency_key for j in out.done])  # fresh completed_at
        copies_done: list[int] = []
        if delivery.copies:  # later messages of the batch's keys: done with them, or wait
            done_keys = {j.idempotency_key for j in out.done} | {p.key for p in claims.completed}
            copies_done = [m for k, ids in delivery.copies.items() if k in done_keys for m in ids]
            claims.waits.update(_copies_wait(delivery.together, delivery.copies, out, claims.waits))
        self.outcomes.settle(
            conn,
            out,
            delete=[*(p.msg_id for p in claims.completed), *copies_done],
            waits=claims.waits,
            complete=False,
            done_deleted=together,
        )

    def _run_batch(self, conn: Conn, jobs: list[Job]) -> None:
        try:
            with self.deadline.watch(jobs, conn.info.backend_pid):
                self.handler.handle_batch(conn, jobs)
        except MemoryError:
            raise
        except HANDLER_ERRORS as exc:
            reraise_if_connection_lost(conn, exc)
            log_event(
                Event.BATCH_RETRIED_ONE_BY_ONE,
                {
                    "queue": self.queue,
                    "jobs": len(jobs),
                    "error": describe(exc),
                    "error_type": type(exc).__name__,
                },
                logging.DEBUG,
            )
            raise _BatchFailed from exc

    def _run_one_by_one(self, conn: Conn, jobs: list[Job], out: Outcome) -> None:
        for job in jobs:
            self._run_one(conn, job, out)

    def _run_one(self, conn: Conn, job: Job, out: Outcome) -> None:
        """Run one job in a savepoint: its failure rolls back its own writes only."""

        def run() -> None:
            with conn.transaction():
                self.handler.handle(conn, job)

        self.attempt(conn, job, out, run)

    # --- run alone -----------------------------------------------------------------------

    def _lease(self, conn: Conn, msg_id: int) -> bool:
        # It was locked with its batch: lease it now, or leave it to whoever has.
        if not q.take_message(conn, self.queue, msg_id, vt_s=self.options.visibility_timeout_s):
            return False
        self.held.take([msg_id])
        return True

    def _run_claimed(self, conn: Conn, job: Job, out: Outcome) -> bool:
        """Run and settle in one transaction that holds the claim. Its leases are extended
        while it runs, as an external job's: if the server ends the transaction (a handler
        stuck outside the database), the claim stays this worker's until the deadline
        records the attempt."""
        with conn.transaction():
            q.bound_transaction(conn, self.options.transaction_limit_ms)
            if not ledger.owns_claim(conn, self.queue, job.idempotency_key, self.worker_id):
                return False
            self.held.hold(job.msg_id, job.idempotency_key)
            try:
                self._run_one(conn, job, out)
            finally:
                self.held.put_down()
            self.outcomes.settle(conn, out)
        return True


def _copies_wait(
    pending: Sequence[Pending], copies: dict[str, list[int]], out: Outcome, waits: dict[int, int]
) -> dict[int, int]:
    """Msg id -> delay for the later copies of keys whose first message of the batch waits:
    a failed attempt's backoff, or another worker's lease. Without it a copy would be
    delivered again at once and run the key's next attempt without its backoff."""
    wait = {f.job_key: f.delay_s for f in out.failures}
    wait.update({p.key: waits[p.msg_id] for p in pending if p.msg_id in waits})
    return {m: wait[key] for key, ids in copies.items() if key in wait for m in ids}
