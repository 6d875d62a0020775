"""Turning pgmq messages into exactly-once effects, without letting any of them stall a queue
(SPEC 6).

Transactional handlers: one transaction per batch locks the messages (the row locks are the
lease: every reader skips locked rows, and they end with the transaction, so with the worker),
claims their keys in the ledger as completed, runs the handler on the same connection and
deletes the messages. Before the handlers run, the batch's message ids are committed to
``workers.deliveries`` on another connection (``DeliveryLog``, overlapping the claim): a
batch whose worker dies (a job that kills the process, a freeze, a cut) leaves that record,
and the next worker to lock one of its messages runs it alone. A job run alone is leased by
its message's visibility timeout and its claim (``processing``, the attempt counted)
commits before the handler: so a job that takes its worker down is isolated, and after
``max_attempts`` such runs it is dead-lettered (``AttemptsExhausted``) while the rest of its
batch completes. When a handler raises inside a batch, the batch rolls back and the next one
runs its jobs one by one, each in a savepoint.

External handlers: one message at a time is taken, leased for the visibility timeout and
counted (``read_ct``); the claim commits before the handler runs; the housekeeping thread
extends both leases while it runs; completion and deletion commit together afterwards. A
claim whose lease expired is taken over by the next delivery as a new attempt.

Every transaction is bounded by the lease (``queries.bound_transaction``): the server ends a
frozen, hung or cut-off worker's transaction, and its locks, after the visibility timeout.
Keys are claimed under try-locks: a key that another worker's open transaction holds is
skipped and retried shortly, never waited for. Bodies over the size limit stay on the
server; bodies the decoder rejects are dead-lettered with their text.
"""

from __future__ import annotations

import json
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
from backend.errors import InvalidEnvelope, PayloadTooLarge, PermanentJobError, UndecodableMessage
from backend.jobs import (
    ExternalHandler,
    Job,
    TransactionalHandler,
    job_from_envelope,
    validate_envelope,
)
from backend.logs import log_event
from backend.workers.backoff import retry_delay_s
from backend.workers.deliveries import DeliveryLog

HandlerKind = Literal["transactional", "external"]
Conn = psycopg.Connection[Any]
Pending = tuple[dict[str, Any], int]  # a valid envelope and its message id
_MAX_ERROR = 2000
_PREVIEW_CHARS = 120
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

    @property
    def transaction_limit_ms(self) -> int:
        return self.visibility_timeout_s * 1000


@dataclass
class Counters:
    """Jobs completed and attempts failed by this process (read by the heartbeat)."""

    processed: int = 0
    failed: int = 0


@dataclass
class HeldJobs:
    """What this worker holds: every message it took and has not settled (given back at once
    when it abandons them), and the external job in hand, whose message and claim leases
    the housekeeping thread extends."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    taken: set[int] = field(default_factory=set)
    in_hand: tuple[int, str] | None = None

    def leased(self) -> tuple[list[int], list[str]]:
        """The message ids and keys whose leases are extended while their handler runs."""
        with self.lock:
            return ([self.in_hand[0]], [self.in_hand[1]]) if self.in_hand else ([], [])

    def snapshot(self) -> tuple[list[int], list[str]]:
        """Every message taken and not settled, and the key of the job in hand."""
        with self.lock:
            return sorted(self.taken), [self.in_hand[1]] if self.in_hand else []

    def take(self, msg_ids: Sequence[int]) -> None:
        with self.lock:
            self.taken.update(msg_ids)

    def hold(self, msg_id: int, key: str) -> None:
        with self.lock:
            self.in_hand = (msg_id, key)

    def put_down(self) -> None:
        with self.lock:
            self.in_hand = None

    def clear(self) -> None:
        with self.lock:
            self.taken.clear()
            self.in_hand = None


@dataclass
class _Sorted:
    fresh: list[Pending] = field(default_factory=list)  # run together in one transaction
    alone: list[Pending] = field(default_factory=list)  # delivered before, or external
    letters: list[q.DeadLetter] = field(default_factory=list)
    # later messages of a key already in this batch: key -> msg ids
    duplicates: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Outcome:
    done: list[Job] = field(default_factory=list)
    failures: list[q.Failure] = field(default_factory=list)
    letters: list[q.DeadLetter] = field(default_factory=list)


class Processor:
    """Processes one delivery at a time for one queue; the run loop calls ``process_batch``."""

    def __init__(
        self,
        *,
        queue: str,
        worker_id: str,
        kind: HandlerKind,
        handler: TransactionalHandler | ExternalHandler,
        options: ProcessingOptions,
        deliveries: DeliveryLog | None = None,
        counters: Counters | None = None,
        held: HeldJobs | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if kind == "transactional" and deliveries is None:
            raise ValueError("a transactional processor records its deliveries: give it a DeliveryLog")
        self.queue = queue
        self.worker_id = worker_id
        self.kind = kind
        self.handler = handler
        self.options = options
        self.deliveries = deliveries
        self.counters = counters or Counters()
        self.held = held or HeldJobs()
        self.rng = rng or random.Random()
        self.in_flight = 0
        self._careful = False

    def process_batch(self, conn: Conn, should_stop: Callable[[], bool] = lambda: False) -> int:
        """Take and process up to one batch (one message for external handlers); return how
        many messages were taken."""
        try:
            if self.kind == "transactional":
                return self._transactional_delivery(conn, should_stop)
            return self._external_delivery(conn, should_stop)
        finally:
            self.in_flight = 0
            self.held.clear()

    def _transactional_delivery(self, conn: Conn, should_stop: Callable[[], bool]) -> int:
        o = self.options
        out = _Outcome()
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
                )
                if not messages:
                    return 0
                self.in_flight = len(messages)
                batch = self._sort(messages)
                out.letters.extend(batch.letters)
                self._batch(conn, batch, out)
        except _BatchFailed:
            self._careful = True
            # Rolled back by this worker, nothing lost: not a delivery that left no outcome.
            self._deliveries().forget(o.visibility_timeout_s)
            return len(messages)
        self._careful = False
        self._after_commit(out)
        for envelope, _ in batch.fresh:  # their copies were deleted or delayed with them
            batch.duplicates.pop(envelope["idempotency_key"], None)
        self._alone(conn, batch, should_stop)
        return len(messages)

    def _external_delivery(self, conn: Conn, should_stop: Callable[[], bool]) -> int:
        o = self.options
        messages = q.fetch_messages(
            conn, self.queue, qty=1, vt_s=o.visibility_timeout_s, max_bytes=o.max_payload_bytes
        )
        if not messages:
            return 0
        self.held.take([m.msg_id for m in messages])
        self.in_flight = len(messages)
        batch = self._sort(messages)
        if batch.letters:
            out = _Outcome(letters=batch.letters)
            with conn.transaction():
                q.bound_transaction(conn, o.transaction_limit_ms)
                self._settle(conn, out)
            self._after_commit(out)
        unstarted = self._alone(conn, batch, should_stop)
        # Not started (draining): visible again now, this delivery uncounted.
        q.release_messages(conn, self.queue, unstarted)
        return len(messages)

    def _deliveries(self) -> DeliveryLog:
        assert self.deliveries is not None
        return self.deliveries

    # --- sorting a delivery ------------------------------------------------------------

    def _sort(self, messages: Sequence[q.Message]) -> _Sorted:
        out = _Sorted()
        seen: set[str] = set()
        for msg in messages:
            try:
                envelope = validate_envelope(
                    self._decode(msg), max_bytes=self.options.max_payload_bytes, size=msg.size
                )
            except InvalidEnvelope as exc:
                out.letters.append(
                    q.DeadLetter(
                        msg_id=msg.msg_id,
                        job_key=None,
                        error=str(exc),
                        error_type=type(exc).__name__,
                        attempts=0,
                    )
                )
                continue
            key = envelope["idempotency_key"]
            if key in seen:
                out.duplicates.setdefault(key, []).append(msg.msg_id)
                continue
            seen.add(key)
            together = self.kind == "transactional" and not msg.delivered_before
            (out.fresh if together else out.alone).append((envelope, msg.msg_id))
        return out

    def _decode(self, msg: q.Message) -> Any:
        """The body as a Python value; raise ``InvalidEnvelope`` when it is too large or the
        decoder rejects it (nesting deeper than its recursion limit, a number with more
        digits than Python converts, ...)."""
        limit = self.options.max_payload_bytes
        if msg.too_large(limit):
            raise PayloadTooLarge(
                f"body is {msg.size} bytes, over WORKER_MAX_PAYLOAD_BYTES ({limit});"
                f" it starts {_preview(msg.text)}"
            )
        if msg.text is None:
            return None
        try:
            return json.loads(msg.text)
        except (ValueError, RecursionError, MemoryError) as exc:
            raise UndecodableMessage(
                f"body cannot be decoded ({type(exc).__name__}: {_describe(exc)});"
                f" it starts {_preview(msg.text)}"
            ) from None

    # --- claims and outcomes, shared -----------------------------------------------------

    def _claim(
        self,
        conn: Conn,
        pending: Sequence[Pending],
        out: _Outcome,
        *,
        status: str,
        expired: list[Pending] | None = None,
    ) -> tuple[list[Job], list[int], dict[int, int]]:
        """Claim the pending envelopes' keys; return (claimed jobs with their attempt, msg ids
        whose key is already completed, msg id -> delay for keys someone else holds). A
        message whose key is already dead goes to ``out.letters``. A batch's claim leaves a
        ``processing`` claim whose lease expired (a run alone that ended with its worker gone
        or its transaction ended) to the ``expired`` list: such a job runs alone again,
        counted, never merely delayed."""
        attempts = q.claim(
            conn,
            queue=self.queue,
            worker_id=self.worker_id,
            status=status,
            keys=[env["idempotency_key"] for env, _ in pending],
            msg_ids=[msg_id for _, msg_id in pending],
            lease_s=self.options.visibility_timeout_s,
        )
        claimed = [
            job_from_envelope(
                env, msg_id=msg_id, queue_name=self.queue, attempt=attempts[env["idempotency_key"]]
            )
            for env, msg_id in pending
            if env["idempotency_key"] in attempts
        ]
        others = [(env, msg_id) for env, msg_id in pending if env["idempotency_key"] not in attempts]
        completed: list[int] = []
        later: dict[int, int] = {}
        if others:
            ledger = q.ledger_status(conn, [env["idempotency_key"] for env, _ in others])
            for env, msg_id in others:
                # missing: another worker's open transaction is claiming or running the key
                state, lease_left = ledger.get(env["idempotency_key"], ("missing", 0.0))
                if state == "completed":
                    completed.append(msg_id)
                elif state == "dead":
                    out.letters.append(
                        q.DeadLetter(
                            msg_id=msg_id,
                            job_key=env["idempotency_key"],
                            error="idempotency key already dead-lettered; replay that dead letter",
                            error_type="DeadKey",
                            attempts=0,
                        )
                    )
                elif state == "processing" and lease_left <= 0 and expired is not None:
                    expired.append((env, msg_id))
                else:
                    later[msg_id] = max(1, int(lease_left) + 1)
        return claimed, completed, later

    def _fail(self, job: Job, exc: Exception, out: _Outcome) -> None:
        error = _describe(exc)
        permanent = isinstance(exc, PermanentJobError)
        if permanent or job.attempt >= self.options.max_attempts:
            reason = error if permanent else f"{error} (attempt {job.attempt} of {self.options.max_attempts})"
            out.letters.append(
                q.DeadLetter(
                    msg_id=job.msg_id,
                    job_key=job.idempotency_key,
                    error=reason,
                    error_type=type(exc).__name__,
                    attempts=job.attempt,
                )
            )
            return
        delay = retry_delay_s(
            job.attempt, base_s=self.options.retry_base_s, max_s=self.options.retry_max_s, rng=self.rng
        )
        out.failures.append(
            q.Failure(job_key=job.idempotency_key, msg_id=job.msg_id, error=error, delay_s=delay)
        )
        log_event(
            "JOB_FAILED",
            {
                "queue": self.queue,
                "job_key": job.idempotency_key,
                "msg_id": job.msg_id,
                "attempt": job.attempt,
                "max_attempts": self.options.max_attempts,
                "error": error,
                "error_type": type(exc).__name__,
                "retry_in_s": delay,
            },
            logging.WARNING,
        )

    def _settle(
        self,
        conn: Conn,
        out: _Outcome,
        *,
        delete: Sequence[int] = (),
        later: dict[int, int] | None = None,
        complete: bool = True,
    ) -> None:
        """Write every outcome: completions, failures, dead letters, deletions."""
        if complete:
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
            log_event(
                "JOB_DEAD_LETTERED",
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

    # --- a batch (transactional) ---------------------------------------------------------

    def _batch(self, conn: Conn, batch: _Sorted, out: _Outcome) -> None:
        """Inside the batch's transaction: record the delivery, claim (as completed), handle,
        settle, delete. Optimistic: the handler gets the whole batch; when it raises, the
        transaction rolls back and the next batch runs one by one (``_careful``)."""
        deliveries = self._deliveries()
        recorded = bool(batch.fresh)
        if recorded:
            deliveries.record([msg_id for _, msg_id in batch.fresh])
        expired: list[Pending] = []
        claimed, completed, later = self._claim(conn, batch.fresh, out, status="completed", expired=expired)
        if expired:  # after the commit, alone, their copies with them
            batch.alone.extend(expired)
            batch.fresh = [p for p in batch.fresh if p not in expired]
        if recorded:
            deliveries.confirm(self.options.visibility_timeout_s)  # before any handler runs
        started = time.monotonic()
        if self._careful:
            self._run_one_by_one(conn, claimed, out)
        elif claimed:
            self._run_batch(conn, claimed)
            out.done.extend(claimed)
        if out.done and time.monotonic() - started > _STALE_COMPLETION_S:
            q.complete(conn, [j.idempotency_key for j in out.done])  # fresh completed_at
        already = set(completed)
        done_keys = {j.idempotency_key for j in out.done} | {
            env["idempotency_key"] for env, msg_id in batch.fresh if msg_id in already
        }
        copies_done = [m for k, ids in batch.duplicates.items() if k in done_keys for m in ids]
        later.update(_copies_wait(batch.fresh, batch.duplicates, out, later))
        self._settle(conn, out, delete=[*completed, *copies_done], later=later, complete=False)

    def _transactional(self) -> TransactionalHandler:
        assert self.kind == "transactional"
        return self.handler  # type: ignore[return-value]

    def _run_batch(self, conn: Conn, jobs: list[Job]) -> None:
        try:
            self._transactional().handle_batch(conn, jobs)
        except MemoryError:
            raise
        except Exception as exc:
            _reraise_if_connection_lost(conn, exc)
            log_event(
                "BATCH_RETRIED_ONE_BY_ONE",
                {
                    "queue": self.queue,
                    "jobs": len(jobs),
                    "error": _describe(exc),
                    "error_type": type(exc).__name__,
                },
                logging.DEBUG,
            )
            raise _BatchFailed from exc

    def _run_one_by_one(self, conn: Conn, jobs: list[Job], out: _Outcome) -> None:
        handler = self._transactional()
        for job in jobs:
            try:
                with conn.transaction():
                    handler.handle(conn, job)
                out.done.append(job)
            except MemoryError:
                raise
            except Exception as exc:
                _reraise_if_connection_lost(conn, exc)
                self._fail(job, exc, out)

    # --- jobs run alone ------------------------------------------------------------------

    def _alone(self, conn: Conn, batch: _Sorted, should_stop: Callable[[], bool]) -> list[int]:
        """Run each job of ``batch.alone`` on its own, the ones whose last run ended with their
        worker gone last; return the message ids not started because of a stop."""
        pending = self._suspects_last(conn, batch.alone)
        while pending and not should_stop():
            envelope, msg_id = pending.pop(0)
            key = envelope["idempotency_key"]
            if self.kind == "transactional":
                # It was locked with its batch: lease it now, or leave it to whoever has.
                if not q.take_message(conn, self.queue, msg_id, vt_s=self.options.visibility_timeout_s):
                    batch.duplicates.pop(key, None)
                    continue
                self.held.take([msg_id])
            self.in_flight = 1
            done, wait_s = self._run_alone(conn, (envelope, msg_id))
            copies = batch.duplicates.pop(key, [])
            if done:
                q.delete_messages(conn, self.queue, copies)
            elif wait_s:
                q.set_visibility(conn, self.queue, copies, [wait_s] * len(copies))
            else:
                batch.duplicates[key] = copies
        return [msg_id for _, msg_id in pending] + [m for ids in batch.duplicates.values() for m in ids]

    def _suspects_last(self, conn: Conn, pending: list[Pending]) -> list[Pending]:
        if len(pending) < 2:
            return list(pending)
        ledger = q.ledger_status(conn, [env["idempotency_key"] for env, _ in pending])
        return sorted(
            pending, key=lambda p: (ledger.get(p[0]["idempotency_key"], ("",))[0] == "processing", p[1])
        )

    def _run_alone(self, conn: Conn, pending: Pending) -> tuple[bool, int]:
        """Claim one job (its attempt counted and committed), run it, settle it; return whether
        its key is completed afterwards, and else the seconds its message waits before the
        next delivery (0: none set)."""
        out = _Outcome()
        limit_ms = self.options.transaction_limit_ms
        with conn.transaction():
            q.bound_transaction(conn, limit_ms)
            claimed, completed, later = self._claim(conn, [pending], out, status="processing")
            if not claimed:
                self._settle(conn, out, delete=completed, later=later)
        if claimed and claimed[0].attempt > self.options.max_attempts:
            out.letters.append(self._exhausted(claimed[0]))
            with conn.transaction():
                q.bound_transaction(conn, limit_ms)
                self._settle(conn, out)
        elif claimed:
            job = claimed[0]
            run = self._run_transactional_alone if self.kind == "transactional" else self._run_external
            if not run(conn, job, out):
                log_event(
                    "JOB_CLAIM_LOST",
                    {
                        "queue": self.queue,
                        "job_key": job.idempotency_key,
                        "msg_id": job.msg_id,
                        "attempt": job.attempt,
                    },
                    logging.WARNING,
                )
                return False, 0
        self._after_commit(out)
        waits = [f.delay_s for f in out.failures] + list(later.values())
        return bool(out.done or completed), max(waits, default=0)

    def _exhausted(self, job: Job) -> q.DeadLetter:
        """Every earlier run of this job ended with its worker gone inside the handler
        (a job that kills or freezes the process): never run it again."""
        last = job.attempt - 1
        return q.DeadLetter(
            msg_id=job.msg_id,
            job_key=job.idempotency_key,
            error_type="AttemptsExhausted",
            error=f"attempt {last} of {self.options.max_attempts} ended with its worker gone before"
            " the handler finished (killed, crashed, frozen or cut off for longer than"
            " WORKER_VISIBILITY_TIMEOUT_S); not run again",
            attempts=last,
        )

    def _run_transactional_alone(self, conn: Conn, job: Job, out: _Outcome) -> bool:
        """Run and settle in one transaction that holds the claim; False when the claim was
        taken over meanwhile."""
        with conn.transaction():
            q.bound_transaction(conn, self.options.transaction_limit_ms)
            if not q.owns_claim(conn, job.idempotency_key, self.worker_id):
                return False
            try:
                with conn.transaction():
                    self._transactional().handle(conn, job)
                out.done.append(job)
            except MemoryError:
                raise
            except Exception as exc:
                _reraise_if_connection_lost(conn, exc)
                self._fail(job, exc, out)
            self._settle(conn, out)
        return True

    def _run_external(self, conn: Conn, job: Job, out: _Outcome) -> bool:
        """Run the handler with its leases extended, then settle; False when another worker
        took the job over (the extension failed and the leases lapsed)."""
        handler: ExternalHandler = self.handler  # type: ignore[assignment]
        self.held.hold(job.msg_id, job.idempotency_key)
        try:
            handler.handle(job)
            out.done.append(job)
        except MemoryError:
            raise
        except Exception as exc:
            self._fail(job, exc, out)
        finally:
            self.held.put_down()
        with conn.transaction():
            q.bound_transaction(conn, self.options.transaction_limit_ms)
            if not q.owns_claim(conn, job.idempotency_key, self.worker_id):
                return False
            self._settle(conn, out)
        return True


def _copies_wait(
    pending: Sequence[Pending], duplicates: dict[str, list[int]], out: _Outcome, later: dict[int, int]
) -> dict[int, int]:
    """Msg id -> delay for the later copies of keys whose first message of the batch waits:
    a failed attempt's backoff, or another worker's lease. Without it a copy would be
    delivered again at once and run the key's next attempt without its backoff."""
    if not duplicates:
        return {}
    wait = {f.job_key: f.delay_s for f in out.failures}
    wait.update({env["idempotency_key"]: later[msg_id] for env, msg_id in pending if msg_id in later})
    return {m: wait[key] for key, ids in duplicates.items() if key in wait for m in ids}


def _preview(text: str | None) -> str:
    if not text:
        return "empty"
    return repr(text[:_PREVIEW_CHARS]) + ("..." if len(text) > _PREVIEW_CHARS else "")


def _describe(exc: BaseException) -> str:
    # NUL cannot be stored in a text column; one in an error message must not stop the
    # failure from being recorded.
    text = " ".join(str(exc).replace("\x00", "\\0").split()) or type(exc).__name__
    return text[:_MAX_ERROR]


def _reraise_if_connection_lost(conn: Conn, exc: Exception) -> None:
    """A handler error on a dead connection is the connection's end (an outage, or the
    server ending a transaction past its bound), not a job failure."""
    if conn.broken or conn.closed:
        if isinstance(exc, psycopg.Error):
            raise exc
        raise psycopg.OperationalError("connection lost while running a handler") from exc
