"""Turning a batch of pgmq messages into exactly-once effects (SPEC 6).

Transactional handlers: one transaction per batch locks the messages (the row locks are the
lease: every reader skips locked rows, and they end with the transaction), claims their keys in the
ledger as completed, runs the handler on the same connection and deletes the messages.
A kill at any point rolls all of it back and the messages are visible at once. The batch
runs optimistically in one go; when a handler raises, the transaction rolls back and the
next batch runs the jobs one by one, each in its own savepoint, so one bad job costs only
itself.

External handlers: the claim (``processing`` with a lease) commits before the handler runs;
the housekeeping thread extends the message's visibility and the claim's lease while it
runs; completion and deletion commit together afterwards. A claim whose lease expired is
taken over by the next delivery as a new attempt.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg

from backend.config import DEFAULTS
from backend.db import queries as q
from backend.errors import InvalidEnvelope, PermanentJobError
from backend.logs import log_event
from backend.workers.backoff import retry_delay_s
from backend.workers.jobs import (
    ExternalHandler,
    Job,
    TransactionalHandler,
    job_from_envelope,
    validate_envelope,
)

HandlerKind = Literal["transactional", "external"]
Conn = psycopg.Connection[Any]
_MAX_ERROR = 2000
# Claims of transactional jobs are written as completed; a batch whose handlers ran longer
# than this rewrites completed_at, so the ledger's time stays within it of the truth.
_STALE_COMPLETION_S = 1.0


class _BatchFailed(Exception):
    """A handler raised inside an optimistic batch: roll it back, redo it one by one."""


@dataclass(frozen=True, kw_only=True)
class ProcessingOptions:
    """The tunables of processing, with the contract's defaults (``backend.config.TUNABLES``)."""

    batch_size: int = DEFAULTS["WORKER_BATCH_SIZE"]
    visibility_timeout_s: int = DEFAULTS["WORKER_VISIBILITY_TIMEOUT_S"]
    max_attempts: int = DEFAULTS["WORKER_MAX_ATTEMPTS"]
    retry_base_s: float = DEFAULTS["WORKER_RETRY_BASE_S"]
    retry_max_s: float = DEFAULTS["WORKER_RETRY_MAX_S"]
    max_payload_bytes: int = DEFAULTS["WORKER_MAX_PAYLOAD_BYTES"]


@dataclass
class Counters:
    """Jobs completed and attempts failed by this process (read by the heartbeat)."""

    processed: int = 0
    failed: int = 0


@dataclass
class HeldJobs:
    """Messages an external worker holds and the keys it has claimed: leases to extend."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    msg_ids: set[int] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)

    def snapshot(self) -> tuple[list[int], list[str]]:
        with self.lock:
            return sorted(self.msg_ids), sorted(self.keys)

    def hold(self, msg_ids: Sequence[int]) -> None:
        with self.lock:
            self.msg_ids.update(msg_ids)

    def drop(self, msg_id: int, key: str | None = None) -> None:
        with self.lock:
            self.msg_ids.discard(msg_id)
            if key is not None:
                self.keys.discard(key)

    def claim(self, key: str) -> None:
        with self.lock:
            self.keys.add(key)

    def clear(self) -> None:
        with self.lock:
            self.msg_ids.clear()
            self.keys.clear()


@dataclass
class _Sorted:
    # valid envelopes with their message ids, first message of each key only
    jobs: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    letters: list[q.DeadLetter] = field(default_factory=list)
    # later messages of a key already in this batch: key -> msg ids
    duplicates: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Outcome:
    done: list[Job] = field(default_factory=list)
    failures: list[q.Failure] = field(default_factory=list)
    letters: list[q.DeadLetter] = field(default_factory=list)


class Processor:
    """Processes one batch at a time for one queue; the run loop calls ``process_batch``."""

    def __init__(self, *, queue: str, worker_id: str, kind: HandlerKind,
                 handler: TransactionalHandler | ExternalHandler, options: ProcessingOptions,
                 counters: Counters | None = None, held: HeldJobs | None = None,
                 rng: random.Random | None = None) -> None:
        self.queue = queue
        self.worker_id = worker_id
        self.kind = kind
        self.handler = handler
        self.options = options
        self.counters = counters or Counters()
        self.held = held or HeldJobs()
        self.rng = rng or random.Random()
        self.in_flight = 0
        self._careful = False

    def process_batch(self, conn: Conn, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Read and process up to one batch; return how many messages were read."""
        if self.kind == "transactional":
            return self._transactional_batch(conn)
        return self._external_batch(conn, should_stop)

    # --- shared ------------------------------------------------------------------------

    def _sort(self, messages: Sequence[q.Message]) -> _Sorted:
        out = _Sorted()
        seen: set[str] = set()
        for msg in messages:
            try:
                envelope = validate_envelope(msg.body, max_bytes=self.options.max_payload_bytes,
                                             size=msg.size)
            except InvalidEnvelope as exc:
                out.letters.append(q.DeadLetter(msg_id=msg.msg_id, job_key=None, body=msg.body,
                                                error=str(exc), error_type="InvalidEnvelope",
                                                attempts=0))
                continue
            key = envelope["idempotency_key"]
            if key in seen:
                out.duplicates.setdefault(key, []).append(msg.msg_id)
                continue
            seen.add(key)
            out.jobs.append((envelope, msg.msg_id))
        return out

    def _claim(self, conn: Conn, pending: Sequence[tuple[dict[str, Any], int]], out: _Outcome,
               *, status: str) -> tuple[list[Job], list[int], dict[int, int]]:
        """Claim the pending envelopes' keys; return (claimed jobs with their attempt, msg ids
        whose key is already completed, msg id -> delay for keys someone else holds). A
        message whose key is already dead goes to ``out.letters``."""
        attempts = q.claim(conn, queue=self.queue, worker_id=self.worker_id, status=status,
                           keys=[env["idempotency_key"] for env, _ in pending],
                           msg_ids=[msg_id for _, msg_id in pending],
                           lease_s=self.options.visibility_timeout_s)
        claimed = [job_from_envelope(env, msg_id=msg_id, queue_name=self.queue,
                                     attempt=attempts[env["idempotency_key"]])
                   for env, msg_id in pending if env["idempotency_key"] in attempts]
        others = [(env, msg_id) for env, msg_id in pending if env["idempotency_key"] not in attempts]
        completed: list[int] = []
        later: dict[int, int] = {}
        if others:
            ledger = q.ledger_status(conn, [env["idempotency_key"] for env, _ in others])
            for env, msg_id in others:
                state, lease_left = ledger.get(env["idempotency_key"], ("missing", 0.0))
                if state == "completed":
                    completed.append(msg_id)
                elif state == "dead":
                    out.letters.append(q.DeadLetter(
                        msg_id=msg_id, job_key=env["idempotency_key"], body=env,
                        error="idempotency key already dead-lettered; replay that dead letter",
                        error_type="DeadKey", attempts=0))
                else:
                    later[msg_id] = max(1, int(lease_left) + 1)
        return claimed, completed, later

    def _fail(self, job: Job, exc: Exception, out: _Outcome) -> None:
        error = _describe(exc)
        permanent = isinstance(exc, PermanentJobError)
        if permanent or job.attempt >= self.options.max_attempts:
            reason = error if permanent else f"{error} (attempt {job.attempt} of {self.options.max_attempts})"
            out.letters.append(q.DeadLetter(msg_id=job.msg_id, job_key=job.idempotency_key,
                                            body=_envelope_of(job), error=reason,
                                            error_type=type(exc).__name__, attempts=job.attempt))
            return
        delay = retry_delay_s(job.attempt, base_s=self.options.retry_base_s,
                              max_s=self.options.retry_max_s, rng=self.rng)
        out.failures.append(q.Failure(job_key=job.idempotency_key, msg_id=job.msg_id,
                                      error=error, delay_s=delay))
        log_event("JOB_FAILED", {"queue": self.queue, "job_key": job.idempotency_key,
                                 "msg_id": job.msg_id, "attempt": job.attempt,
                                 "max_attempts": self.options.max_attempts,
                                 "error": error, "error_type": type(exc).__name__,
                                 "retry_in_s": delay}, logging.WARNING)

    def _settle(self, conn: Conn, out: _Outcome, *, delete: Sequence[int] = (),
                later: dict[int, int] | None = None, complete: bool = True) -> None:
        """Write every outcome of a batch: completions, failures, dead letters, deletions."""
        if complete:
            q.complete(conn, [j.idempotency_key for j in out.done])
        q.record_failures(conn, out.failures)
        delays = {f.msg_id: f.delay_s for f in out.failures}
        delays.update(later or {})
        # Locked messages (transactional) were not counted as read by pgmq: count this delivery.
        q.set_visibility(conn, self.queue, list(delays), list(delays.values()),
                         delivered=self.kind == "transactional")
        q.dead_letter(conn, queue=self.queue, worker_id=self.worker_id, letters=out.letters)
        q.delete_messages(conn, self.queue, [*(j.msg_id for j in out.done), *delete])

    def _after_commit(self, out: _Outcome) -> None:
        self.counters.processed += len(out.done)
        self.counters.failed += len(out.failures) + sum(1 for d in out.letters if d.job_key)
        for letter in out.letters:
            log_event("JOB_DEAD_LETTERED", {"queue": self.queue, "job_key": letter.job_key,
                                            "msg_id": letter.msg_id, "attempts": letter.attempts,
                                            "error": letter.error,
                                            "error_type": letter.error_type}, logging.ERROR)

    # --- transactional -----------------------------------------------------------------

    def _transactional_batch(self, conn: Conn) -> int:
        """One transaction: lock, claim (as completed), handle, settle, delete, commit.

        The batch runs optimistically in one go. When a handler raises, the whole
        transaction rolls back (the messages are visible again at once, no attempt is
        counted) and the next batch runs careful: each job in its own savepoint.
        """
        out = _Outcome()
        careful = self._careful
        try:
            with conn.transaction():
                messages = q.lock_messages(conn, self.queue, self.options.batch_size)
                if not messages:
                    return 0
                self.in_flight = len(messages)
                batch = self._sort(messages)
                out.letters.extend(batch.letters)
                claimed, completed, later = self._claim(conn, batch.jobs, out, status="completed")
                started = time.monotonic()
                if careful:
                    self._run_one_by_one(conn, claimed, out)
                elif claimed:
                    self._run_batch(conn, claimed)
                    out.done.extend(claimed)
                if out.done and time.monotonic() - started > _STALE_COMPLETION_S:
                    q.complete(conn, [j.idempotency_key for j in out.done])  # fresh completed_at
                already = set(completed)
                done_keys = {j.idempotency_key for j in out.done} | {
                    env["idempotency_key"] for env, msg_id in batch.jobs if msg_id in already}
                dup_delete = [m for k, ids in batch.duplicates.items() if k in done_keys for m in ids]
                later.update(_copies_wait(batch, out, later))
                self._settle(conn, out, delete=[*completed, *dup_delete], later=later, complete=False)
        except _BatchFailed:
            self._careful = True
            return self.in_flight
        finally:
            self.in_flight = 0
        self._careful = False
        self._after_commit(out)
        return len(messages)

    def _run_batch(self, conn: Conn, jobs: list[Job]) -> None:
        handler: TransactionalHandler = self.handler  # type: ignore[assignment]
        try:
            handler.handle_batch(conn, jobs)
        except MemoryError:
            raise
        except Exception as exc:
            _reraise_if_connection_lost(conn)
            log_event("BATCH_RETRIED_ONE_BY_ONE", {"queue": self.queue, "jobs": len(jobs),
                                                   "error": _describe(exc),
                                                   "error_type": type(exc).__name__}, logging.DEBUG)
            raise _BatchFailed from exc

    def _run_one_by_one(self, conn: Conn, jobs: list[Job], out: _Outcome) -> None:
        handler: TransactionalHandler = self.handler  # type: ignore[assignment]
        for job in jobs:
            try:
                with conn.transaction():
                    handler.handle(conn, job)
                out.done.append(job)
            except MemoryError:
                raise
            except Exception as exc:
                _reraise_if_connection_lost(conn)
                self._fail(job, exc, out)

    # --- external ----------------------------------------------------------------------

    def _external_batch(self, conn: Conn, should_stop: Callable[[], bool]) -> int:
        messages = q.read_messages(conn, self.queue, self.options.visibility_timeout_s,
                                   self.options.batch_size)
        if not messages:
            return 0
        self.held.hold([m.msg_id for m in messages])
        try:
            batch = self._sort(messages)
            if batch.letters:
                out = _Outcome(letters=batch.letters)
                with conn.transaction():
                    self._settle(conn, out)
                self._after_commit(out)
            pending = list(batch.jobs)
            while pending and not should_stop():
                envelope, msg_id = pending.pop(0)
                key = envelope["idempotency_key"]
                self.in_flight = 1
                done, wait_s = self._external_one(conn, (envelope, msg_id))
                self.held.drop(msg_id, key)
                if done:
                    q.delete_messages(conn, self.queue, batch.duplicates.pop(key, []))
                elif wait_s and key in batch.duplicates:
                    dupes = batch.duplicates.pop(key)
                    q.set_visibility(conn, self.queue, dupes, [wait_s] * len(dupes))
            # Not started (draining) or duplicates of unfinished keys: visible again now.
            release = [msg_id for _, msg_id in pending] + [m for ids in batch.duplicates.values()
                                                           for m in ids]
            q.set_visibility(conn, self.queue, release, [0] * len(release))
        finally:
            self.in_flight = 0
            self.held.clear()
        return len(messages)

    def _external_one(self, conn: Conn, pending: tuple[dict[str, Any], int]) -> tuple[bool, int]:
        """Run one external job; return whether its key is completed afterwards, and else the
        seconds its message waits before the next delivery (0: none set)."""
        out = _Outcome()
        with conn.transaction():
            claimed, completed, later = self._claim(conn, [pending], out, status="processing")
            if not claimed:
                self._settle(conn, out, delete=completed, later=later)
        if claimed and claimed[0].attempt > self.options.max_attempts:
            # Every earlier attempt ended with its worker dead inside the handler (a job
            # that kills the process): never run it again.
            job = claimed[0]
            out.letters.append(q.DeadLetter(
                msg_id=job.msg_id, job_key=job.idempotency_key, body=_envelope_of(job),
                error=f"{job.attempt - 1} attempts ended with their worker gone before the"
                      " handler finished", error_type="AttemptsExhausted", attempts=job.attempt - 1))
            with conn.transaction():
                self._settle(conn, out)
        elif claimed:
            job = claimed[0]
            self.held.claim(job.idempotency_key)
            handler: ExternalHandler = self.handler  # type: ignore[assignment]
            try:
                handler.handle(job)
                out.done.append(job)
            except MemoryError:
                raise
            except Exception as exc:
                self._fail(job, exc, out)
            with conn.transaction():
                if not q.owns_claim(conn, job.idempotency_key, self.worker_id):
                    # Our leases lapsed (their extension failed) and another worker took the
                    # job over: its claim and the message are now that worker's business.
                    log_event("JOB_CLAIM_LOST", {"queue": self.queue, "job_key": job.idempotency_key,
                                                 "msg_id": job.msg_id, "attempt": job.attempt},
                              logging.WARNING)
                    return False, 0
                self._settle(conn, out)
        self._after_commit(out)
        waits = [f.delay_s for f in out.failures] + list(later.values())
        return bool(out.done or completed), max(waits, default=0)


def _copies_wait(batch: _Sorted, out: _Outcome, later: dict[int, int]) -> dict[int, int]:
    """Msg id -> delay for the later copies of keys whose first message of the batch waits:
    a failed attempt's backoff, or another worker's lease. Without it a copy would be
    delivered again at once and run the key's next attempt without its backoff."""
    if not batch.duplicates:
        return {}
    wait = {f.job_key: f.delay_s for f in out.failures}
    wait.update({env["idempotency_key"]: later[msg_id] for env, msg_id in batch.jobs
                 if msg_id in later})
    return {m: wait[key] for key, ids in batch.duplicates.items() if key in wait for m in ids}


def _envelope_of(job: Job) -> dict[str, Any]:
    body: dict[str, Any] = {"idempotency_key": job.idempotency_key, "entity_type": job.entity_type,
                            "entity_id": job.entity_id, "org_id": job.org_id,
                            "payload": dict(job.payload)}
    if job.trace_id is not None:
        body["trace_id"] = job.trace_id
    if job.created_at is not None:
        body["created_at"] = job.created_at
    return body


def _describe(exc: BaseException) -> str:
    # NUL cannot be stored in a text column; one in an error message must not stop the
    # failure from being recorded.
    text = " ".join(str(exc).replace("\x00", "\\0").split()) or type(exc).__name__
    return text[:_MAX_ERROR]


def _reraise_if_connection_lost(conn: Conn) -> None:
    """A handler error on a dead connection is a database outage, not a job failure."""
    if conn.broken or conn.closed:
        raise psycopg.OperationalError("connection lost while running a handler")
