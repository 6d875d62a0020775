"""Turning pgmq messages into exactly-once effects, without letting any of them stall a
queue (SPEC 6): what both kinds of worker share.

A ``Strategy`` takes one delivery at a time from its queue (``process``). The two kinds
differ in how they take messages and run handlers (``TransactionalStrategy``,
``ExternalStrategy``); they share how a delivery is sorted (decoding and size limits,
copies of one key), how keys are claimed in the ledger, how failures turn into retries or
dead letters, and how a job runs alone: its message leased by visibility, its claim
(``processing``, the attempt counted) committed before the handler, so a job that takes
its worker down is isolated and, after ``max_attempts`` such runs, dead-lettered
(``AttemptsExhausted``) while the rest of the queue moves.

Every transaction is bounded by the lease (``queries.bound_transaction``): the server ends
a frozen, hung or cut-off worker's transaction, and its locks, after the visibility
timeout. Keys are claimed under try-locks: a key that another worker's open transaction
holds is skipped and retried shortly, never waited for. A claim whose worker's process is
gone is given back at once (``rescue``), not when its lease ends.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import psycopg

from backend.backoff import retry_delay_s
from backend.db import ledger
from backend.db import queries as q
from backend.db.connect import DB_ERRORS
from backend.db.ledger import DeadLetter, Failure, LedgerStatus
from backend.errors import JobTimedOut, PermanentJobError, RetryableError, describe
from backend.events import Event
from backend.jobs import Job, job_from_envelope
from backend.logs import EVENT_LOGGER, log_event
from backend.workers.deadline import Call, Deadline
from backend.workers.delivery import Claims, Delivery, Outcome, Pending, ProcessingOptions, sort_delivery
from backend.workers.held import Counters, HeldJobs

Conn = psycopg.Connection[Any]
ShouldStop = Callable[[], bool]

_LOG = logging.getLogger(EVENT_LOGGER)
# What a handler raises that is its job's failure. ``sys.exit`` and ``KeyboardInterrupt``
# from a job are too: signals never raise here (``SignalWatcher``), so they came from its code.
HANDLER_ERRORS = (Exception, SystemExit, KeyboardInterrupt)
# Jobs run alone after the others when their last run ended so: it may end the next one too.
_SUSPECT = (LedgerStatus.PROCESSING, LedgerStatus.FAILED)
# A busy worker looks for claims of dead workers this often (an idle one at each poll).
RESCUE_INTERVAL_S = 1.0


class Strategy:
    """What both kinds share; the run loop calls ``process``."""

    def __init__(
        self,
        *,
        queue: str,
        worker_id: str,
        options: ProcessingOptions,
        counters: Counters | None = None,
        held: HeldJobs | None = None,
        rng: random.Random | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self.queue = queue
        self.worker_id = worker_id
        self.options = options
        self.counters = counters or Counters()
        self.held = held or HeldJobs()
        self.rng = rng or random.Random()
        # Every handler call runs under it; without one (a test), none is ever interrupted.
        self.deadline = deadline or Deadline(deadline_s=float("inf"), on_hung=lambda call: None)
        self.in_flight = 0
        self.shared_keys = False  # the ledger's key is still the key alone (before 0007)
        self._next_rescue = 0.0

    def process(self, conn: Conn, should_stop: ShouldStop = lambda: False) -> int:
        """Take and process up to one delivery; return how many messages were taken."""
        try:
            if self.options.rescue_orphans and time.monotonic() >= self._next_rescue:
                self._log_rescued(ledger.rescue_orphans(conn, queue=self.queue, worker_id=self.worker_id))
            return self._deliver(conn, should_stop)
        finally:
            self.in_flight = 0
            self.held.clear()

    def has_work(self, conn: Conn) -> bool:
        """The idle check: whether a message is visible, after giving back the claims of
        workers whose process is gone. One statement either way."""
        if not self.options.rescue_orphans:
            return q.has_visible(conn, self.queue)
        visible, rescued = ledger.visible_or_rescued(conn, queue=self.queue, worker_id=self.worker_id)
        self._log_rescued(rescued)
        return visible

    def _log_rescued(self, rescued: Sequence[ledger.Rescued]) -> None:
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

    def _deliver(self, conn: Conn, should_stop: ShouldStop) -> int:
        raise NotImplementedError

    # --- the kind's steps ----------------------------------------------------------------

    def _runs_together(self, msg: q.Message) -> bool:
        """Whether ``msg`` runs in the delivery's shared transaction."""
        return False

    def _lease(self, conn: Conn, msg_id: int) -> bool:
        """Lease a message about to run alone; False when another worker has it."""
        return True

    def _run_claimed(self, conn: Conn, job: Job, out: Outcome) -> bool:
        """Run a job whose claim is committed, and settle it; False when the claim was
        taken over meanwhile."""
        raise NotImplementedError

    def sort(self, messages: Sequence[q.Message]) -> Delivery:
        """The delivery's messages sorted (``delivery.sort_delivery``) the kind's way."""
        return sort_delivery(messages, self.options.max_payload_bytes, self._runs_together)

    # --- claims and outcomes ---------------------------------------------------------------

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
        """Claim the pending envelopes' keys. A message whose key is already dead goes to
        ``out.letters``. A batch's claim leaves a ``processing`` claim whose lease expired
        (a run alone that ended with its worker gone or its transaction ended) to the
        ``expired`` list: such a job runs alone again, counted, never merely delayed.
        ``delete_claimed``: the claimed jobs' messages are deleted with the claim
        (``ledger.claim``)."""
        attempts = None
        while attempts is None:
            if self.shared_keys:
                pending = self._refuse_shared_keys(conn, pending, out)
            try:
                with conn.transaction() if self.shared_keys else nullcontext():
                    attempts = ledger.claim(
                        conn,
                        queue=self.queue,
                        worker_id=self.worker_id,
                        status=status,
                        keys=[env["idempotency_key"] for env, _ in pending],
                        msg_ids=[msg_id for _, msg_id in pending],
                        lease_s=self.options.visibility_timeout_s,
                        delete_claimed=delete_claimed,
                    )
            except psycopg.errors.UniqueViolation:
                if not self.shared_keys:
                    raise
                # Another queue claimed one of the keys since they were looked up: its
                # savepoint rolled back, the next look refuses it.
        result = Claims(
            jobs=[
                job_from_envelope(
                    env, msg_id=msg_id, queue_name=self.queue, attempt=attempts[env["idempotency_key"]]
                )
                for env, msg_id in pending
                if env["idempotency_key"] in attempts
            ]
        )
        others = [(env, msg_id) for env, msg_id in pending if env["idempotency_key"] not in attempts]
        _debug = _LOG.isEnabledFor(logging.DEBUG)
        if others:
            states = ledger.ledger_status(conn, self.queue, [env["idempotency_key"] for env, _ in others])
            for env, msg_id in others:
                # None: another worker's open transaction is claiming or running the key
                state, lease_left = states.get(env["idempotency_key"], (None, 0.0))
                if state == LedgerStatus.COMPLETED:
                    result.completed.append(msg_id)
                    if _debug:
                        log_event(
                            Event.JOB_SKIPPED,
                            {
                                "queue": self.queue,
                                "job_key": env["idempotency_key"],
                                "msg_id": msg_id,
                                "reason": "its key is already completed: deleted without running",
                            },
                            logging.DEBUG,
                        )
                elif state == LedgerStatus.DEAD:
                    out.letters.append(
                        DeadLetter(
                            msg_id=msg_id,
                            job_key=env["idempotency_key"],
                            error="idempotency key already dead-lettered; replay that dead letter",
                            error_type="DeadKey",
                            attempts=0,
                        )
                    )
                elif state == LedgerStatus.PROCESSING and lease_left <= 0 and expired is not None:
                    expired.append((env, msg_id))
                else:
                    result.waits[msg_id] = max(1, int(lease_left) + 1)
        return result

    def _refuse_shared_keys(self, conn: Conn, pending: Sequence[Pending], out: Outcome) -> list[Pending]:
        """Before migration 0007 a key is unique across queues: a key another queue holds
        would make the claim fail, so its message is dead-lettered (replayable once 0007 is
        applied) and the rest of the batch goes on."""
        taken = ledger.keys_on_other_queues(conn, self.queue, [env["idempotency_key"] for env, _ in pending])
        if not taken:
            return list(pending)
        if ledger.keys_are_per_queue(conn):  # 0007 was applied since this worker booted
            self.shared_keys = False
            return list(pending)
        for env, msg_id in pending:
            other = taken.get(env["idempotency_key"])
            if other:
                out.letters.append(
                    DeadLetter(
                        msg_id=msg_id,
                        job_key=env["idempotency_key"],
                        error=f"the key is in use on {other}, and keys are unique across queues until"
                        " migration 0007 is applied: run python -m backend.db.migrate once no worker"
                        " older than schema 6 runs, then replay this letter",
                        error_type="KeyInUseOnAnotherQueue",
                        attempts=0,
                    )
                )
        return [p for p in pending if p[0]["idempotency_key"] not in taken]

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
            self.fail(job, exc, out)
        else:
            out.done.append(job)

    def fail(self, job: Job, exc: BaseException, out: Outcome) -> None:
        """Record a handler's failure: a retry after the backoff, or a dead letter when the
        error is permanent or the attempts are used up."""
        error = describe(exc)
        permanent = isinstance(exc, PermanentJobError)
        if permanent or job.attempt >= self.options.max_attempts:
            reason = (
                error
                if permanent
                else f"{error} (attempt {job.attempt} of {self.options.max_attempts}: the last)"
            )
            out.letters.append(
                DeadLetter(
                    msg_id=job.msg_id,
                    job_key=job.idempotency_key,
                    error=reason,
                    error_type=type(exc).__name__,
                    attempts=job.attempt,
                )
            )
            return
        o = self.options
        asked = exc.retry_after_s if isinstance(exc, RetryableError) else None
        delay = retry_delay_s(
            job.attempt, base_s=o.retry_base_s, max_s=o.retry_max_s, rng=self.rng, at_least_s=asked
        )
        out.failures.append(
            Failure(job_key=job.idempotency_key, msg_id=job.msg_id, error=error, delay_s=delay)
        )
        log_event(
            Event.JOB_FAILED,
            {
                "queue": self.queue,
                "job_key": job.idempotency_key,
                "msg_id": job.msg_id,
                "attempt": job.attempt,
                "max_attempts": o.max_attempts,
                "error": error,
                "error_type": type(exc).__name__,
                "retry_in_s": delay,
                "retry_after_s": asked,
            },
            logging.WARNING,
        )

    def settle(
        self,
        conn: Conn,
        out: Outcome,
        *,
        delete: Sequence[int] = (),
        waits: dict[int, int] | None = None,
        complete: bool = True,
        done_deleted: bool = False,
    ) -> None:
        """Write every outcome: completions, failures, dead letters, deletions
        (``done_deleted``: the done jobs' messages are deleted already, with their claim)."""
        if complete:
            ledger.complete(conn, self.queue, [j.idempotency_key for j in out.done])
        ledger.record_failures(conn, self.queue, out.failures)
        delays = {f.msg_id: f.delay_s for f in out.failures}
        delays.update(waits or {})
        q.set_visibility(conn, self.queue, list(delays), list(delays.values()))
        ledger.dead_letter(conn, queue=self.queue, worker_id=self.worker_id, letters=out.letters)
        done = () if done_deleted else (j.msg_id for j in out.done)
        q.delete_messages(conn, self.queue, [*done, *delete])

    def after_commit(self, out: Outcome) -> None:
        """Count the outcome and log each dead letter, once its transaction committed."""
        self.counters.processed += len(out.done)
        self.counters.failed += len(out.failures) + sum(1 for d in out.letters if d.job_key)
        if out.done and _LOG.isEnabledFor(logging.DEBUG):  # per job: never built at INFO
            for job in out.done:
                log_event(
                    Event.JOB_COMPLETED,
                    {
                        "queue": self.queue,
                        "job_key": job.idempotency_key,
                        "msg_id": job.msg_id,
                        "attempt": job.attempt,
                    },
                    logging.DEBUG,
                )
        for letter in out.letters:
            log_event(
                Event.JOB_DEAD_LETTERED,
                {
                    "queue": self.queue,
                    "job_key": letter.job_key,
                    "msg_id": letter.msg_id,
                    "attempts": letter.attempts,
                    "error": letter.error,
                    "error_type": letter.error_type,
                },
                logging.ERROR,
            )

    def record_timeout(
        self, open_conn: Callable[[], AbstractContextManager[Conn]], call: Call, *, interrupted: bool
    ) -> None:
        """Record a handler call past its deadline on a connection of its own (``open_conn``),
        not the loop's: a job whose claim is committed (run alone, external) fails its attempt
        (``JobTimedOut``: retried after its backoff, dead-lettered after the last attempt); a
        batch's claims roll back with its transaction, and its record runs its jobs alone.

        Not ``interrupted``: the handler still runs, so the loop's session is ended first
        (its transaction, and the locks the claim waits for, go with it)."""
        where = call.stack[-1] if call.stack else "unknown"
        error = JobTimedOut(
            f"the handler ran past its deadline of {call.deadline_s:g} s (WORKER_JOB_TIMEOUT_S),"
            f" {'interrupted' if interrupted else 'not giving control back'} at {where}"
        )
        out = Outcome()
        try:
            with open_conn() as conn:
                if not interrupted and call.backend_pid:
                    conn.execute("SELECT pg_terminate_backend(%s)", (call.backend_pid,))
                with conn.transaction():
                    q.bound_transaction(conn, self.options.transaction_limit_ms)
                    for job in call.jobs:
                        if ledger.owns_claim(conn, self.queue, job.idempotency_key, self.worker_id):
                            self.fail(job, error, out)
                    self.settle(conn, out)
            outcome = (
                f"dead-lettered (attempt {call.jobs[0].attempt}, the last)"
                if out.letters
                else f"attempt {call.jobs[0].attempt} failed, retried in {out.failures[0].delay_s} s"
                if out.failures
                else "nothing recorded: no claim of it was committed (a batch's, rolled back with it:"
                " each of its jobs runs alone next) or its claim was taken over"
            )
        except DB_ERRORS as exc:
            out = Outcome()
            outcome = f"not recorded ({describe(exc)}): the job runs again when its lease ends"
        job = call.jobs[0]
        log_event(
            Event.JOB_TIMED_OUT,
            {
                "queue": self.queue,
                "job_key": job.idempotency_key,
                "msg_id": job.msg_id,
                "jobs": len(call.jobs),
                "attempt": job.attempt,
                "seconds": round((call.interrupted_at or self.deadline.clock()) - call.started, 3),
                "deadline_s": call.deadline_s,
                "interrupted": interrupted,
                "stack": call.stack,
                "outcome": outcome,
                "fix": "give the handler's blocking calls (sockets, locks, libraries) timeouts shorter"
                " than WORKER_JOB_TIMEOUT_S, or raise it",
            },
            logging.ERROR,
        )
        self.after_commit(out)

    # --- jobs run alone ------------------------------------------------------------------

    def run_alone(self, conn: Conn, delivery: Delivery, should_stop: ShouldStop) -> list[int]:
        """Run each job of ``delivery.alone`` on its own, the ones whose last run failed or
        ended with their worker gone (a killer, a hung handler) after the others; return the
        message ids not started because of a stop."""
        pending = self._suspects_last(conn, delivery.alone)
        while pending and not should_stop():
            envelope, msg_id = pending.pop(0)
            key = envelope["idempotency_key"]
            if not self._lease(conn, msg_id):
                delivery.copies.pop(key, None)
                continue
            self.in_flight = 1
            done, wait_s = self._one(conn, (envelope, msg_id))
            copies = delivery.copies.pop(key, [])
            if done:
                q.delete_messages(conn, self.queue, copies)
            elif wait_s:
                q.set_visibility(conn, self.queue, copies, [wait_s] * len(copies))
            else:
                delivery.copies[key] = copies
        return [msg_id for _, msg_id in pending] + [m for ids in delivery.copies.values() for m in ids]

    def _suspects_last(self, conn: Conn, pending: list[Pending]) -> list[Pending]:
        if len(pending) < 2:
            return list(pending)
        states = ledger.ledger_status(conn, self.queue, [env["idempotency_key"] for env, _ in pending])
        return sorted(
            pending,
            key=lambda p: (states.get(p[0]["idempotency_key"], (None,))[0] in _SUSPECT, p[1]),
        )

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
                self.settle(conn, out, delete=claims.completed, waits=claims.waits)
        if claims.jobs and claims.jobs[0].attempt > self.options.max_attempts:
            out.letters.append(self._exhausted(claims.jobs[0]))
            with conn.transaction():
                q.bound_transaction(conn, limit_ms)
                self.settle(conn, out)
        elif claims.jobs:
            job = claims.jobs[0]
            if not self._run_claimed(conn, job, out):
                log_event(
                    Event.JOB_CLAIM_LOST,
                    {
                        "queue": self.queue,
                        "job_key": job.idempotency_key,
                        "msg_id": job.msg_id,
                        "attempt": job.attempt,
                    },
                    logging.WARNING,
                )
                return False, 0
        self.after_commit(out)
        waits = [f.delay_s for f in out.failures] + list(claims.waits.values())
        return bool(out.done or claims.completed), max(waits, default=0)

    def _exhausted(self, job: Job) -> DeadLetter:
        """Every earlier run of this job ended with its worker gone inside the handler
        (a job that kills or freezes the process): never run it again."""
        last = job.attempt - 1
        return DeadLetter(
            msg_id=job.msg_id,
            job_key=job.idempotency_key,
            error_type="AttemptsExhausted",
            error=f"attempt {last} of {self.options.max_attempts} ended with its worker gone before"
            " the handler finished (killed, crashed, frozen or cut off for longer than"
            " WORKER_VISIBILITY_TIMEOUT_S); not run again",
            attempts=last,
        )


def reraise_if_connection_lost(conn: Conn, exc: BaseException) -> None:
    """A handler error on a dead connection is the connection's end (an outage, or the
    server ending a transaction past its bound), not a job failure."""
    if conn.broken or conn.closed:
        if isinstance(exc, psycopg.Error):
            raise exc
        raise psycopg.OperationalError("connection lost while running a handler") from exc
