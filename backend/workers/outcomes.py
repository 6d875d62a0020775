"""What becomes of a job once its handler ran: a failure turned into a retry or a dead
letter (``fail``), every outcome of a delivery written in one go (``settle``), then counted
and logged once its transaction committed (``report``). A handler call past its deadline is
recorded the same way, on a connection of its own (``record_timeout``)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from backend.backoff import retry_delay_s
from backend.db import ledger
from backend.db import queries as q
from backend.db.connect import DB_ERRORS
from backend.db.ledger import DeadLetter, Failure
from backend.errors import JobTimedOut, PermanentJobError, RetryableError, describe
from backend.events import Event
from backend.jobs import Job
from backend.logs import EVENT_LOGGER, log_event
from backend.workers.deadline import Call
from backend.workers.held import Counters
from backend.workers.records import Outcome, Pending, ProcessingOptions

Conn = psycopg.Connection[Any]
_LOG = logging.getLogger(EVENT_LOGGER)


class Outcomes:
    """Records and reports the outcomes of one worker's jobs."""

    def __init__(
        self,
        *,
        queue: str,
        worker_id: str,
        options: ProcessingOptions,
        counters: Counters,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.worker_id = worker_id
        self.options = options
        self.counters = counters
        self.rng = rng
        self.clock = clock

    def fail(self, job: Job, exc: BaseException, out: Outcome) -> None:
        """Record a handler's failure: a retry after the backoff, or a dead letter when the
        error is permanent or the attempts are used up."""
        error = describe(exc)
        o = self.options
        permanent = isinstance(exc, PermanentJobError)
        if permanent or job.attempt >= o.max_attempts:
            reason = error if permanent else f"{error} (attempt {job.attempt} of {o.max_attempts}: the last)"
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

    def exhausted(self, job: Job) -> DeadLetter:
        """The letter of a job whose every earlier run ended with its worker gone inside the
        handler (a job that kills or freezes the process): it is never run again."""
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

    def report(self, out: Outcome) -> None:
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

    def report_skipped(self, completed: Sequence[Pending]) -> None:
        """Messages whose key is already completed: deleted without running (logged at debug)."""
        if not _LOG.isEnabledFor(logging.DEBUG):
            return
        for p in completed:
            log_event(
                Event.JOB_SKIPPED,
                {
                    "queue": self.queue,
                    "job_key": p.key,
                    "msg_id": p.msg_id,
                    "reason": "its key is already completed: deleted without running",
                },
                logging.DEBUG,
            )

    def report_claim_lost(self, job: Job) -> None:
        """Another worker took the job over while it ran: its outcome is that worker's."""
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
                "seconds": round((call.interrupted_at or self.clock()) - call.started, 3),
                "deadline_s": call.deadline_s,
                "interrupted": interrupted,
                "stack": call.stack,
                "outcome": outcome,
                "fix": "give the handler's blocking calls (sockets, locks, libraries) timeouts shorter"
                " than WORKER_JOB_TIMEOUT_S, or raise it",
            },
            logging.ERROR,
        )
        self.report(out)
