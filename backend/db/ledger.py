"""The idempotency ledger (``workers.processed_jobs``) and the dead letters, as thin named
functions. A key's status is a ``LedgerStatus``."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from backend.db import locks
from backend.db.queries import delete_messages, execute_bounded, for_queue, int_array

Conn = psycopg.Connection[Any]


class LedgerStatus(StrEnum):
    """A key's state in ``workers.processed_jobs.status``."""

    PROCESSING = "processing"  # claimed, its lease running (external jobs, jobs run alone)
    COMPLETED = "completed"  # done; the key is never run again
    FAILED = "failed"  # an attempt failed; retried after its backoff
    DEAD = "dead"  # dead-lettered; only a replay runs it again

    @property
    def sql(self) -> str:
        """The status as an SQL literal."""
        return f"'{self.value}'"


_PROCESSING, _COMPLETED, _FAILED, _DEAD = (s.sql for s in LedgerStatus)


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """A message that will not be retried, and why."""

    msg_id: int
    job_key: str | None
    error: str
    error_type: str
    attempts: int


@dataclass(frozen=True, kw_only=True)
class Failure:
    """A failed attempt to record in the ledger, with the message's retry delay."""

    job_key: str
    msg_id: int
    error: str
    delay_s: int


# --- claims --------------------------------------------------------------------------

# Keys are claimed under a transaction-scoped advisory lock taken with ``try``: a key that
# another worker's open transaction is claiming or running is skipped, never waited for.
# The lock is per (queue, key), like the ledger's key (``locks.CLAIM_SEED``).
_CLAIM = f"""
INSERT INTO workers.processed_jobs AS p
    (job_key, queue_name, msg_id, status, attempts, worker_id, lease_expires_at,
     created_at, updated_at, completed_at)
SELECT k, %(queue)s, m, %(status)s, 1, %(worker)s,
       CASE WHEN %(status)s = {_PROCESSING} THEN clock_timestamp() + make_interval(secs => %(lease)s) END,
       clock_timestamp(), clock_timestamp(),
       CASE WHEN %(status)s = {_COMPLETED} THEN clock_timestamp() END
FROM unnest(%(keys)b::text[], %(ids)s::bigint[]) AS t(k, m)
-- A key with a live claim is not even try-locked: a batch that will not claim it must not
-- hold its lock until its commit, while the claim's owner waits for it to start the run.
-- The live claims are read once per statement (the partial index of them), not probed per key.
WHERE CASE WHEN t.k = ANY (ARRAY(SELECT l.job_key FROM workers.processed_jobs AS l
                                 WHERE l.status = {_PROCESSING} AND l.queue_name = %(queue)s
                                   AND l.lease_expires_at > clock_timestamp()))
           THEN false
           ELSE pg_try_advisory_xact_lock(
                    hashtextextended(%(queue)s || chr(31) || t.k, {locks.CLAIM_SEED})) END
ORDER BY k  -- one row lock order for every worker: no deadlocks between batches
ON CONFLICT (queue_name, job_key) DO UPDATE
SET status = EXCLUDED.status, attempts = p.attempts + 1, msg_id = EXCLUDED.msg_id,
    worker_id = EXCLUDED.worker_id,
    lease_expires_at = EXCLUDED.lease_expires_at, completed_at = EXCLUDED.completed_at,
    updated_at = clock_timestamp()
WHERE (p.status = {_FAILED} AND coalesce(p.lease_expires_at <= clock_timestamp(), true))
   OR (%(status)s = {_PROCESSING} AND p.status = {_PROCESSING}
       AND p.lease_expires_at < clock_timestamp())
RETURNING p.job_key, p.attempts, p.msg_id
"""


_CLAIM_AND_DELETE = (
    f"WITH c AS ({_CLAIM}), d AS (DELETE FROM {{table}}"
    " WHERE msg_id = ANY (ARRAY(SELECT c.msg_id FROM c))) SELECT job_key, attempts FROM c"
)


@functools.cache
def _claim_sql(delete_from: str | None) -> str:
    """The claim; with ``delete_from``, the claimed keys' messages of that queue deleted in
    the same statement."""
    if delete_from is None:
        return _CLAIM
    return for_queue(_CLAIM_AND_DELETE, delete_from)


def claim(
    conn: Conn,
    *,
    queue: str,
    worker_id: str,
    keys: Sequence[str],
    msg_ids: Sequence[int],
    lease_s: float,
    status: LedgerStatus = LedgerStatus.PROCESSING,
    delete_claimed: bool = False,
) -> dict[str, int]:
    """Claim each key not completed, dead, held by a live lease or by another worker's open
    transaction; return key -> attempt.

    ``processing`` commits a claim with a lease before the handler runs (external jobs, and
    transactional jobs run alone): it also takes over a claim whose lease expired, the trace
    of a worker that died in the handler. ``completed`` is for a transactional batch, whose
    claim and effects commit together or not at all; it leaves an expired claim alone, so
    such a job is run alone, with its delivery counted first.

    ``delete_claimed`` (``completed`` only) deletes the claimed keys' messages in the same
    statement: a transactional batch's claims, effects and deletions commit together or not
    at all, so the batch saves a statement.
    """
    if not keys:
        return {}
    if delete_claimed and status != LedgerStatus.COMPLETED:
        raise ValueError("only a claim as completed deletes its messages with it")
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            _claim_sql(queue if delete_claimed else None),
            {
                "queue": queue,
                "worker": worker_id,
                "lease": lease_s,
                "status": status,
                "keys": list(keys),
                "ids": int_array(msg_ids),
            },
        ).fetchall()
    return {key: attempt for key, attempt, *_ in rows}


def keys_are_per_queue(conn: Conn) -> bool:
    """Whether the ledger's key is (queue_name, job_key) (migration 0007), not the key alone."""
    row = conn.execute(
        "SELECT pg_get_constraintdef(oid) AS d FROM pg_constraint"
        " WHERE conname = 'processed_jobs_pkey' AND conrelid = 'workers.processed_jobs'::regclass"
    ).fetchone()
    return bool(row and "queue_name" in row["d"])


def keys_on_other_queues(conn: Conn, queue: str, keys: Sequence[str]) -> dict[str, str]:
    """key -> the other queue that holds it, for keys the old key-alone constraint would
    refuse on ``queue`` (before migration 0007)."""
    rows = conn.execute(
        "SELECT job_key, queue_name FROM workers.processed_jobs WHERE job_key = ANY(%s) AND queue_name <> %s",
        (list(keys), queue),
    ).fetchall()
    return {r["job_key"]: r["queue_name"] for r in rows}


def ledger_status(conn: Conn, queue: str, keys: Sequence[str]) -> dict[str, tuple[LedgerStatus, float]]:
    """key -> (status, seconds left on its lease, 0 when none) for the queue's existing keys."""
    rows = conn.execute(
        "SELECT job_key, status, greatest(0, extract(epoch FROM lease_expires_at"
        " - clock_timestamp()))::float8 AS lease_left FROM workers.processed_jobs"
        " WHERE queue_name = %s AND job_key = ANY(%s)",
        (queue, list(keys)),
    ).fetchall()
    return {r["job_key"]: (LedgerStatus(r["status"]), r["lease_left"] or 0.0) for r in rows}


# The claim's own lock (as ``_CLAIM`` takes it), waited for: a claim in progress ends first.
_OWNS_CLAIM = f"""
SELECT 1 AS ok
FROM workers.processed_jobs,
     pg_advisory_xact_lock(hashtextextended(%(q)s || chr(31) || %(k)s, {locks.CLAIM_SEED}))
WHERE queue_name = %(q)s AND job_key = %(k)s AND worker_id = %(w)s AND status = {_PROCESSING}
FOR UPDATE OF processed_jobs"""


def owns_claim(conn: Conn, queue: str, key: str, worker_id: str) -> bool:
    """Lock this worker's live claim of ``key`` for this transaction; False when another
    worker took it over. Waits (within the transaction's bound) for a claim in progress."""
    row = conn.execute(_OWNS_CLAIM, {"q": queue, "k": key, "w": worker_id}).fetchone()
    return row is not None


def complete(conn: Conn, queue: str, keys: Sequence[str]) -> None:
    """Mark the queue's keys completed now (their claims end)."""
    if keys:
        conn.execute(
            f"UPDATE workers.processed_jobs SET status = {_COMPLETED}, lease_expires_at = NULL,"
            " completed_at = clock_timestamp(), updated_at = clock_timestamp()"
            " WHERE queue_name = %s AND job_key = ANY(%s)",
            (queue, list(keys)),
        )


def record_failures(conn: Conn, queue: str, failures: Sequence[Failure]) -> None:
    """Mark the attempts failed. A failed key's ``lease_expires_at`` is the end of its
    backoff: no copy of the key is claimed before then (``claim``)."""
    if not failures:
        return
    conn.execute(
        f"UPDATE workers.processed_jobs p SET status = {_FAILED}, last_error = f.err,"
        " lease_expires_at = clock_timestamp() + make_interval(secs => f.d),"
        " completed_at = NULL, updated_at = clock_timestamp()"
        " FROM unnest(%s::text[], %s::text[], %s::int[]) AS f(k, err, d)"
        " WHERE p.queue_name = %s AND p.job_key = f.k",
        ([f.job_key for f in failures], [f.error for f in failures], [f.delay_s for f in failures], queue),
    )


def release_claims(conn: Conn, queue: str, worker_id: str, keys: Sequence[str]) -> None:
    """Expire the leases of claims this worker gives up, so the next delivery takes over."""
    if keys:
        conn.execute(
            "UPDATE workers.processed_jobs SET lease_expires_at = clock_timestamp(),"
            " updated_at = clock_timestamp() WHERE queue_name = %s AND job_key = ANY(%s)"
            f" AND worker_id = %s AND status = {_PROCESSING}",
            (queue, list(keys), worker_id),
        )


_EXTEND_LEASES = f"""
WITH messages AS (
    UPDATE {{table}} SET vt = clock_timestamp() + make_interval(secs => %(lease)s)
    WHERE msg_id = ANY(%(ids)s::bigint[]) RETURNING 1
), claims AS (
    UPDATE workers.processed_jobs
    SET lease_expires_at = clock_timestamp() + make_interval(secs => %(lease)s),
        updated_at = clock_timestamp()
    WHERE queue_name = %(q)s AND job_key = ANY (ARRAY(
        SELECT job_key FROM workers.processed_jobs
        WHERE queue_name = %(q)s AND job_key = ANY(%(keys)s::text[]) AND worker_id = %(w)s
          AND status = {_PROCESSING}
        FOR UPDATE SKIP LOCKED))
    RETURNING 1
)
SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM claims)"""


def extend_leases(
    conn: Conn,
    *,
    queue: str,
    worker_id: str,
    msg_ids: Sequence[int],
    keys: Sequence[str],
    lease_s: int,
    limit_ms: int,
) -> None:
    """Keep running jobs invisible and their claims live for another ``lease_s``, in one
    statement bounded by ``limit_ms`` (``execute_bounded``). A claim row locked by the job's
    own open transaction (a transactional job run alone) is skipped, not waited for: while
    that lock stands nobody can take the claim over."""
    execute_bounded(
        conn,
        for_queue(_EXTEND_LEASES, queue),
        {"lease": lease_s, "ids": list(msg_ids), "keys": list(keys), "q": queue, "w": worker_id},
        limit_ms=limit_ms,
    )


# --- dead letters ------------------------------------------------------------------------


_DEAD_LETTER = f"""
WITH moved AS (
    INSERT INTO workers.dead_letters
        (queue_name, msg_id, job_key, message, error, error_type, attempts, worker_id, headers)
    SELECT %(queue)s, d.m, d.k, q.message, d.e, d.t, d.a, %(worker)s, nullif(to_jsonb(q) -> 'headers', 'null')
    FROM unnest(%(ids)s::bigint[], %(keys)s::text[], %(errors)s::text[], %(types)s::text[],
                %(attempts)s::int[]) AS d(m, k, e, t, a)
    JOIN {{table}} AS q ON q.msg_id = d.m
    RETURNING job_key, error
)
UPDATE workers.processed_jobs p
SET status = {_DEAD}, last_error = moved.error, lease_expires_at = NULL, completed_at = NULL,
    updated_at = clock_timestamp()
FROM moved WHERE p.queue_name = %(queue)s AND p.job_key = moved.job_key AND p.status <> {_DEAD}"""


def dead_letter(conn: Conn, *, queue: str, worker_id: str, letters: Iterable[DeadLetter]) -> None:
    """Move messages to ``workers.dead_letters`` with their body and pgmq headers as queued
    (copied on the server; ``to_jsonb`` reads headers where the table has them, pgmq 1.5+), mark
    their keys dead, delete them. A message already gone leaves no letter."""
    letters = list(letters)
    if not letters:
        return
    conn.execute(
        for_queue(_DEAD_LETTER, queue),
        {
            "queue": queue,
            "worker": worker_id,
            "ids": [d.msg_id for d in letters],
            "keys": [d.job_key for d in letters],
            "errors": [d.error for d in letters],
            "types": [d.error_type for d in letters],
            "attempts": [d.attempts for d in letters],
        },
    )
    delete_messages(conn, queue, [d.msg_id for d in letters])
