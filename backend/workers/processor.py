"""Turning pgmq messages into exactly-once effects, without letting any of them stall a
queue (docs/ARCHITECTURE.md, "How a message flows"): the ``Processor``, what both kinds of worker share.

A ``Processor`` takes one delivery at a time from its queue (``process``). The two kinds
fill its abstract hooks (``TransactionalProcessor``, ``ExternalProcessor``): how they take
messages and run handlers. They share the steps around them: the delivery sorted
(``sorting``), keys claimed (``claims``), outcomes written and reported (``outcomes``), and
how a job runs alone: its message leased by visibility, its claim (``processing``, the
attempt counted) committed before the handler, so a job that takes its worker down is
isolated and, after ``max_attempts`` such runs, dead-lettered (``AttemptsExhausted``) while
the rest of the queue moves.

Every transaction is bounded by the lease (``queries.bound_transaction``): the server ends
a frozen, hung or cut-off worker's transaction, and its locks, after the visibility
timeout. A claim whose worker's process is gone is given back at once (``rescue``), not
when its lease ends.
"""

from __future__ import annotations

import abc
import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from backend.db import ledger, rescue
from backend.db import queries as q
from backend.db.ledger import LedgerStatus
from backend.events import Event
from backend.jobs import Job
from backend.logs import log_event
from backend.workers.claims import Claimer, SharedKeysClaimer
from backend.workers.deadline import Call, Deadline
from backend.workers.held import Counters, HeldJobs
from backend.workers.outcomes import Outcomes
from backend.workers.records import Claims, Delivery, Outcome, Pending, ProcessingOptions
from backend.workers.sorting import sort_delivery

Conn = psycopg.Connection[Any]
ShouldStop = Callable[[], bool]

# What a handler raises that is its job's failure. ``sys.exit`` and ``KeyboardInterrupt``
# from a job are too: signals never raise here (``SignalWatcher``), so they came from its code.
HANDLER_ERRORS = (Exception, SystemExit, KeyboardInterrupt)
# Jobs run alone after the others when their last run ended so: it may end the next one too.
_SUSPECT = (LedgerStatus.PROCESSING, LedgerStatus.FAILED)
# A busy worker looks for claims of dead workers this often (an idle one at each poll).
RESCUE_INTERVAL_S = 1.0


class Processor(abc.ABC):
    """What both kinds share; the run loop calls ``process``. Built once, at boot:
    ``shared_keys`` (a schema before migration 0007) picks the ``SharedKeysClaimer``;
    ``headers`` (a queue table with pgmq's headers) reads each message's trace id."""

    def __init__(
        self,
        *,
        queue: str,
        worker_id: str,
        options: ProcessingOptions,
        shared_keys: bool = False,
        headers: bool = False,
        counters: Counters | None = None,
        held: HeldJobs | None = None,
        rng: random.Random | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self.queue = queue
        self.worker_id = worker_id
        self.options = options
        self.headers = headers
        self.counters = counters or Counters()
        self.held = held or HeldJobs()
        # Every handler call runs under it; without one (a test), none is ever interrupted.
        self.deadline = deadline or Deadline(deadline_s=float("inf"), on_hung=lambda call: None)
        claimer = SharedKeysClaimer if shared_keys else Claimer
        self.claimer = claimer(queue=queue, worker_id=worker_id, lease_s=options.visibility_timeout_s)
        self.outcomes = Outcomes(
            queue=queue,
            worker_id=worker_id,
            options=options,
            counters=self.counters,
            rng=rng or random.Random(),
            clock=self.deadline.clock,
        )
        self.in_flight = 0
        self._next_rescue = 0.0

    def process(self, conn: Conn, should_stop: ShouldStop = lambda: False) -> int:
        """Take and process up to one delivery; return how many messages were taken."""
        try:
            if self.options.rescue_orphans and time.monotonic() >= self._next_rescue:
                self._log_rescued(rescue.rescue_orphans(conn, queue=self.queue, worker_id=self.worker_id))
            return self._deliver(conn, should_stop)
        finally:
            self.in_flight = 0
            self.held.clear()

    def has_work(self, conn: Conn) -> bool:
        """The idle check: whether a message is visible, after giving back the claims of
        workers whose process is gone. One statement either way."""
        if not self.options.rescue_orphans:
            return q.has_visible(conn, self.queue)
        visible, rescued = rescue.visible_or_rescued(conn, queue=self.queue, worker_id=self.worker_id)
        self._log_rescued(rescued)
        return visible

    def record_timeout(
        self, open_conn: Callable[[], AbstractContextManager[Conn]], call: Call, *, interrupted: bool
    ) -> None:
        """Record a handler call past its deadline (``Outcomes.record_timeout``)."""
        self.outcomes.record_timeout(open_conn, call, interrupted=interrupted)

    def _log_rescued(self, rescued: Sequence[rescue.Rescued]) -> None:
        self._next_rescue = time.monotonic() + RESCUE_INTERVAL_S
        for r in rescued:
            log_event(
                Event.JOB_RESCUED,
                {
                    "queue": self.queue,
                    "job_key": r.job_key,
                    "msg_id": r.msg_id,
                    "owner": r.owner,
                    "consequence": "its worker's process is gone: delivered again now, the attempt counted,"
                    " instead of when its lease ends",
                },
                logging.WARNING,
            )

    # --- the kind's hooks ----------------------------------------------------------------

    @abc.abstractmethod
    def _deliver(self, conn: Conn, should_stop: ShouldStop) -> int:
        """Take up to one delivery's messages and process them; return how many were taken."""

    @abc.abstractmethod
    def _runs_together(self, msg: q.Message) -> bool:
        """Whether ``msg`` runs in the delivery's shared transaction, or alone."""

    @abc.abstractmethod
    def _lease(self, conn: Conn, msg_id: int) -> bool:
        """Lease a message about to run alone; False when another worker has it."""

    @abc.abstractmethod
    def _run_claimed(self, conn: Conn, job: Job, out: Outcome) -> bool:
        """Run a job whose claim is committed, and settle it; False when the claim was
        taken over meanwhile."""

    # --- the shared steps ----------------------------------------------------------------

    def sort(self, messages: Sequence[q.Message]) -> Delivery:
        """The delivery's messages sorted (``sorting.sort_delivery``) the kind's way."""
        return sort_delivery(messages, self.options.max_payload_bytes, self._runs_together)

    def claim(
        self,
        conn: Conn,
        pending: Sequence[Pending],
        out: Outcome,
        *,
        status: LedgerStatus,
        expired: list[Pending] | None = None,
        delete_claimed: bool = False,
    ) -> Claims:
        """Claim the pending keys (``Claimer.claim``); the duplicates of completed keys logged."""
        claims = self.claimer.claim(
            conn, pending, out, status=status, expired=expired, delete_claimed=delete_claimed
        )
        if claims.completed:
            self.outcomes.report_skipped(claims.completed)
        return claims

    def attempt(self, conn: Conn, job: Job, out: Outcome, run: Callable[[], None]) -> None:
        """Run one job's handler: done, or its failure recorded. A MemoryError and a lost
        connection are not the job's failure: they propagate (a crash, an outage), and so does
        an interrupt at the deadline (``Consumer`` records it once the connection is replaced)."""
        try:
            with self.deadline.watch((job,), conn.info.backend_pid):
                run()
        except MemoryError:
            raise
        except HANDLER_ERRORS as exc:
            reraise_if_connection_lost(conn, exc)
            self.outcomes.fail(job, exc, out)
        else:
            out.done.append(job)

    # --- jobs run alone ------------------------------------------------------------------

    def run_alone(self, conn: Conn, delivery: Delivery, should_stop: ShouldStop) -> list[int]:
        """Run each job of ``delivery.alone`` on its own, the ones whose last run failed or
        ended with their worker gone (a killer, a hung handler) after the others; return the
        message ids not started because of a stop."""
        pending = self._suspects_last(conn, delivery.alone)
        while pending and not should_stop():
            p = pending.pop(0)
            if not self._lease(conn, p.msg_id):
                delivery.copies.pop(p.key, None)
                continue
            self.in_flight = 1
            done, wait_s = self._one(conn, p)
            copies = delivery.copies.pop(p.key, [])
            if done:
                q.delete_messages(conn, self.queue, copies)
            elif wait_s:
                q.set_visibility(conn, self.queue, copies, [wait_s] * len(copies))
            else:
                delivery.copies[p.key] = copies
        return [p.msg_id for p in pending] + [m for ids in delivery.copies.values() for m in ids]

    def _suspects_last(self, conn: Conn, pending: list[Pending]) -> list[Pending]:
        if len(pending) < 2:
            return list(pending)
        states = ledger.ledger_status(conn, self.queue, [p.key for p in pending])
        return sorted(pending, key=lambda p: (states.get(p.key, (None,))[0] in _SUSPECT, p.msg_id))

    def _one(self, conn: Conn, pending: Pending) -> tuple[bool, int]:
        """Claim one job (its attempt counted and committed), run it, settle it; return whether
        its key is completed afterwards, and else the seconds its message waits before the
        next delivery (0: none set)."""
        out = Outcome()
        limit_ms = self.options.transaction_limit_ms
        with conn.transaction():
            q.bound_transaction(conn, limit_ms)
            claims = self.claim(conn, [pending], out, status=LedgerStatus.PROCESSING)
            if not claims.jobs:
                completed = [p.msg_id for p in claims.completed]
                self.outcomes.settle(conn, out, delete=completed, waits=claims.waits)
        if claims.jobs and claims.jobs[0].attempt > self.options.max_attempts:
            out.letters.append(self.outcomes.exhausted(claims.jobs[0]))
            with conn.transaction():
                q.bound_transaction(conn, limit_ms)
                self.outcomes.settle(conn, out)
        elif claims.jobs:
            job = claims.jobs[0]
            if not self._run_claimed(conn, job, out):
                self.outcomes.report_claim_lost(job)
                return False, 0
        self.outcomes.report(out)
        waits = [f.delay_s for f in out.failures] + list(claims.waits.values())
        return bool(out.done or claims.completed), max(waits, default=0)


def reraise_if_connection_lost(conn: Conn, exc: BaseException) -> None:
    """A handler error on a dead connection is the connection's end (an outage, or the
    server ending a transaction past its bound), not a job failure."""
    if conn.broken or conn.closed:
        if isinstance(exc, psycopg.Error):
            raise exc
        raise psycopg.OperationalError("connection lost while running a handler") from exc
