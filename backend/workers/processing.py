"""Turning a batch of pgmq messages into exactly-once effects (SPEC 6).

Transactional handlers: one transaction per batch reads the messages (``pgmq.read`` locks
them: other workers skip locked rows, so the lock is the lease), claims their keys in the
ledger, runs the handler on the same connection, marks the keys completed and deletes the
messages. A kill at any point rolls all of it back and the messages are visible at once.
The batch runs optimistically in one savepoint; when a handler raises, the batch is rolled
back to it and the jobs run one by one, each in its own savepoint, so one bad job costs
only itself.

External handlers: the claim (``processing`` with a lease) commits before the handler runs;
the housekeeping thread extends the message's visibility and the claim's lease while it
runs; completion and deletion commit together afterwards. A claim whose lease expired is
taken over by the next delivery as a new attempt.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import psycopg

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


@dataclass(frozen=True, kw_only=True)
class ProcessingOptions:
    """The tunables of processing, with the contract's defaults."""

    batch_size: int = 100
    visibility_timeout_s: int = 30
    max_attempts: int = 5
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    max_payload_bytes: int = 262144


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
    jobs: list[Job] = field(default_factory=list)
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
                envelope = validate_envelope(msg.body, max_bytes=self.options.max_payload_bytes)
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
            out.jobs.append(job_from_envelope(envelope, msg_id=msg.msg_id, queue_name=self.queue))
        return out

    def _claim(self, conn: Conn, jobs: Sequence[Job], out: _Outcome
               ) -> tuple[list[Job], list[int], dict[int, int]]:
        """Claim ``jobs``; return (claimed jobs with their attempt, msg ids whose key is
        already completed, msg id -> delay for keys someone else holds). A message whose
        key is already dead goes to ``out.letters``."""
        attempts = q.claim(conn, queue=self.queue, worker_id=self.worker_id,
                           keys=[j.idempotency_key for j in jobs], msg_ids=[j.msg_id for j in jobs],
                           lease_s=self.options.visibility_timeout_s)
        claimed = [replace(j, attempt=attempts[j.idempotency_key]) for j in jobs
                   if j.idempotency_key in attempts]
        others = [j for j in jobs if j.idempotency_key not in attempts]
        completed: list[int] = []
        later: dict[int, int] = {}
        if others:
            status = q.ledger_status(conn, [j.idempotency_key for j in others])
            for job in others:
                state, lease_left = status.get(job.idempotency_key, ("missing", 0.0))
                if state == "completed":
                    completed.append(job.msg_id)
                elif state == "dead":
                    out.letters.append(q.DeadLetter(
                        msg_id=job.msg_id, job_key=job.idempotency_key, body=_envelope_of(job),
                        error="idempotency key already dead-lettered; replay that dead letter",
                        error_type="DeadKey", attempts=0))
                else:
                    later[job.msg_id] = max(1, int(lease_left) + 1)
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
                later: dict[int, int] | None = None) -> None:
        """Write every outcome of a batch: completions, failures, dead letters, deletions."""
        q.complete(conn, [j.idempotency_key for j in out.done])
        q.record_failures(conn, out.failures)
        delays = {f.msg_id: f.delay_s for f in out.failures}
        delays.update(later or {})
        q.set_visibility(conn, self.queue, list(delays), list(delays.values()))
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
        out = _Outcome()
        with conn.transaction():
            messages = q.read_messages(conn, self.queue, self.options.visibility_timeout_s,
                                       self.options.batch_size)
            if not messages:
                return 0
            self.in_flight = len(messages)
            batch = self._sort(messages)
            out.letters.extend(batch.letters)
            claimed, completed, later = self._claim(conn, batch.jobs, out)
            self._run_transactional(conn, claimed, out)
            already = set(completed)
            done_keys = {j.idempotency_key for j in out.done} | {
                j.idempotency_key for j in batch.jobs if j.msg_id in already}
            dup_delete = [m for k, ids in batch.duplicates.items() if k in done_keys for m in ids]
            self._settle(conn, out, delete=[*completed, *dup_delete], later=later)
        self.in_flight = 0
        self._after_commit(out)
        return len(messages)

    def _run_transactional(self, conn: Conn, jobs: list[Job], out: _Outcome) -> None:
        if not jobs:
            return
        handler: TransactionalHandler = self.handler  # type: ignore[assignment]
        if len(jobs) > 1:
            try:
                with conn.transaction():
                    handler.handle_batch(conn, jobs)
                out.done.extend(jobs)
                return
            except MemoryError:
                raise
            except Exception:
                _reraise_if_connection_lost(conn)
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
                job = pending.pop(0)
                self.in_flight = 1
                done = self._external_one(conn, job)
                self.held.drop(job.msg_id, job.idempotency_key)
                dupes = batch.duplicates.pop(job.idempotency_key, [])
                if done and dupes:
                    q.delete_messages(conn, self.queue, dupes)
            # Not started (draining) or duplicates of unfinished keys: visible again now.
            release = [j.msg_id for j in pending] + [m for ids in batch.duplicates.values()
                                                     for m in ids]
            q.set_visibility(conn, self.queue, release, [0] * len(release))
        finally:
            self.in_flight = 0
            self.held.clear()
        return len(messages)

    def _external_one(self, conn: Conn, job: Job) -> bool:
        """Run one external job; True when its key is completed afterwards."""
        out = _Outcome()
        with conn.transaction():
            claimed, completed, later = self._claim(conn, [job], out)
            if not claimed:
                self._settle(conn, out, delete=completed, later=later)
        if claimed:
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
                self._settle(conn, out)
        self._after_commit(out)
        return bool(out.done or completed)


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
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:_MAX_ERROR]


def _reraise_if_connection_lost(conn: Conn) -> None:
    """A handler error on a dead connection is a database outage, not a job failure."""
    if conn.broken or conn.closed:
        raise psycopg.OperationalError("connection lost while running a handler")
