"""Every SQL statement of the worker runtime, as thin named functions.

pgmq is used through what 1.4.4 has (``read``, ``send``, ``metrics``) and through its queue
tables' columns that every version has (``msg_id``, ``read_ct``, ``vt``, ``message``):
a transactional batch locks its messages in ``pgmq.q_<queue>`` instead of calling
``pgmq.read``, and deletions and visibility changes are one set-based statement each.
Timestamps come from ``clock_timestamp()``: the moment of the change, not the start of a
long transaction.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]


@dataclass(frozen=True, kw_only=True)
class Message:
    """One pgmq message as read: its parsed body and the size of its JSON text."""

    msg_id: int
    body: Any
    size: int


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """A message that will not be retried, and why."""

    msg_id: int
    job_key: str | None
    body: Any
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


# --- pgmq -------------------------------------------------------------------------------

def queue_table(queue: str) -> str:
    """The quoted name of ``queue``'s pgmq table (pgmq lowercases queue names)."""
    return 'pgmq."q_' + queue.lower().replace('"', '""') + '"'


def _messages(rows: Sequence[tuple[int, str | None]]) -> list[Message]:
    # pgmq.send accepts a NULL message: it reaches validation as None and is dead-lettered.
    return [Message(msg_id=msg_id, body=json.loads(body) if body else None,
                    size=len(body.encode()) if body else 0)
            for msg_id, body in rows]


def read_messages(conn: Conn, queue: str, vt_s: int, qty: int) -> list[Message]:
    """Read up to ``qty`` messages, invisible for ``vt_s`` once this commits (a lease that
    outlives the transaction: external jobs). Bodies come as text: one parse here gives
    both the value and its size."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute("SELECT msg_id, message::text FROM pgmq.read(%s, %s, %s)",
                           (queue, vt_s, qty)).fetchall()
    return _messages(rows)


@functools.cache
def _lock_sql(queue: str) -> str:
    return (f"SELECT msg_id, message::text FROM {queue_table(queue)}"
            " WHERE vt <= clock_timestamp() ORDER BY msg_id LIMIT %s FOR UPDATE SKIP LOCKED")


def lock_messages(conn: Conn, queue: str, qty: int) -> list[Message]:
    """Lock up to ``qty`` visible messages, oldest first, for this transaction.

    The same selection as ``pgmq.read`` without its update: the row locks are the lease
    (every reader skips locked rows) and they end with the transaction, which deletes the
    messages or rolls back. ``pgmq.read`` would also write a new version of every message
    (``vt``, ``read_ct``) that is deleted or rolled back moments later.
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(_lock_sql(queue), (qty,)).fetchall()
    return _messages(rows)


@functools.cache
def _delete_sql(queue: str) -> str:
    return f"DELETE FROM {queue_table(queue)} WHERE msg_id = ANY(%b::bigint[])"


def delete_messages(conn: Conn, queue: str, msg_ids: Sequence[int]) -> None:
    if msg_ids:
        conn.execute(_delete_sql(queue), (list(msg_ids),))


@functools.cache
def _visibility_sql(queue: str, delivered: bool) -> str:
    count = ", read_ct = q.read_ct + 1" if delivered else ""
    return (f"UPDATE {queue_table(queue)} AS q SET vt = clock_timestamp()"
            f" + make_interval(secs => t.d){count}"
            " FROM unnest(%b::bigint[], %b::int[]) AS t(m, d) WHERE q.msg_id = t.m")


def set_visibility(conn: Conn, queue: str, msg_ids: Sequence[int], delays_s: Sequence[int],
                   *, delivered: bool = False) -> None:
    """Make each message visible again after its delay (0: at once). ``delivered`` counts a
    delivery in ``read_ct`` for messages that were locked rather than read with pgmq."""
    if msg_ids:
        conn.execute(_visibility_sql(queue, delivered), (list(msg_ids), list(delays_s)))


def has_visible(conn: Conn, queue: str) -> bool:
    """Whether a message of ``queue`` is visible now (one indexed lookup on ``vt``)."""
    row = conn.execute(
        f"SELECT EXISTS (SELECT 1 FROM {queue_table(queue)} WHERE vt <= clock_timestamp()) AS ok"
    ).fetchone()
    return bool(row and row["ok"])


def read_only(conn: Conn) -> bool:
    """Whether this session cannot write (a standby, or ``default_transaction_read_only``)."""
    row = conn.execute("SELECT current_setting('transaction_read_only') = 'on' AS ro").fetchone()
    return bool(row and row["ro"])


def queue_exists(conn: Conn, queue: str) -> bool:
    row = conn.execute("SELECT to_regclass(format('pgmq.%%I', 'q_' || %s)) IS NOT NULL AS ok",
                       (queue,)).fetchone()
    return bool(row and row["ok"])


def notifications_available(conn: Conn, queue: str) -> bool:
    """Whether inserts into ``queue`` notify: the migrations' statement-level trigger."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgmq'"
        " AND c.relname = 'q_' || %s AND t.tgname = 'workers_notify_insert') AS ok",
        (queue,)).fetchone()
    return bool(row and row["ok"])


def notify_channel(queue: str) -> str:
    return f"pgmq.q_{queue}.INSERT"


# --- the ledger --------------------------------------------------------------------------

_CLAIM = """
INSERT INTO workers.processed_jobs AS p
    (job_key, queue_name, msg_id, status, attempts, worker_id, lease_expires_at,
     created_at, updated_at, completed_at)
SELECT k, %(queue)s, m, %(status)s, 1, %(worker)s,
       CASE WHEN %(status)s = 'processing' THEN clock_timestamp() + make_interval(secs => %(lease)s) END,
       clock_timestamp(), clock_timestamp(),
       CASE WHEN %(status)s = 'completed' THEN clock_timestamp() END
FROM unnest(%(keys)b::text[], %(ids)b::bigint[]) AS t(k, m)
ORDER BY k  -- one lock order for every worker: no deadlocks between batches
ON CONFLICT (job_key) DO UPDATE
SET status = EXCLUDED.status, attempts = p.attempts + 1, msg_id = EXCLUDED.msg_id,
    queue_name = EXCLUDED.queue_name, worker_id = EXCLUDED.worker_id,
    lease_expires_at = EXCLUDED.lease_expires_at, completed_at = EXCLUDED.completed_at,
    updated_at = clock_timestamp()
WHERE p.status = 'failed'
   OR (p.status = 'processing' AND p.lease_expires_at < clock_timestamp())
RETURNING p.job_key, p.attempts
"""


def claim(conn: Conn, *, queue: str, worker_id: str, keys: Sequence[str],
          msg_ids: Sequence[int], lease_s: float, status: str = "processing") -> dict[str, int]:
    """Claim each key not completed, dead, or held by a live lease; return key -> attempt.

    ``processing`` (external jobs) commits a claim with a lease; ``completed`` is for a
    transactional batch, whose claim and effects commit together or not at all (a failed
    job's row is then set to failed before the commit). A key another transaction is
    claiming blocks here until that one ends, so two workers never both claim it.
    """
    if not keys:
        return {}
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(_CLAIM, {"queue": queue, "worker": worker_id, "lease": lease_s,
                                    "status": status, "keys": list(keys),
                                    "ids": list(msg_ids)}).fetchall()
    return dict(rows)


def ledger_status(conn: Conn, keys: Sequence[str]) -> dict[str, tuple[str, float]]:
    """key -> (status, seconds left on its lease, 0 when none) for existing keys."""
    rows = conn.execute(
        "SELECT job_key, status, greatest(0, extract(epoch FROM lease_expires_at"
        " - clock_timestamp()))::float8 AS lease_left FROM workers.processed_jobs"
        " WHERE job_key = ANY(%s)", (list(keys),)).fetchall()
    return {r["job_key"]: (r["status"], r["lease_left"] or 0.0) for r in rows}


def owns_claim(conn: Conn, key: str, worker_id: str) -> bool:
    """Lock this worker's live claim of ``key``; False when another worker took it over."""
    row = conn.execute(
        "SELECT 1 AS ok FROM workers.processed_jobs WHERE job_key = %s AND worker_id = %s"
        " AND status = 'processing' FOR UPDATE", (key, worker_id)).fetchone()
    return row is not None


def complete(conn: Conn, keys: Sequence[str]) -> None:
    if keys:
        conn.execute(
            "UPDATE workers.processed_jobs SET status = 'completed', lease_expires_at = NULL,"
            " completed_at = clock_timestamp(), updated_at = clock_timestamp()"
            " WHERE job_key = ANY(%s)", (list(keys),))


def record_failures(conn: Conn, failures: Sequence[Failure]) -> None:
    """Mark the attempts failed and delay the messages' next delivery."""
    if not failures:
        return
    conn.execute(
        "UPDATE workers.processed_jobs p SET status = 'failed', last_error = f.err,"
        " lease_expires_at = NULL, completed_at = NULL, updated_at = clock_timestamp()"
        " FROM unnest(%s::text[], %s::text[]) AS f(k, err) WHERE p.job_key = f.k",
        ([f.job_key for f in failures], [f.error for f in failures]))


def release_claims(conn: Conn, worker_id: str, keys: Sequence[str]) -> None:
    """Expire the leases of claims this worker gives up, so the next delivery takes over."""
    if keys:
        conn.execute(
            "UPDATE workers.processed_jobs SET lease_expires_at = clock_timestamp(),"
            " updated_at = clock_timestamp() WHERE job_key = ANY(%s) AND worker_id = %s"
            " AND status = 'processing'", (list(keys), worker_id))


def extend_leases(conn: Conn, *, queue: str, worker_id: str, msg_ids: Sequence[int],
                  keys: Sequence[str], lease_s: int) -> None:
    """Keep running jobs invisible and their claims live for another ``lease_s``."""
    set_visibility(conn, queue, msg_ids, [lease_s] * len(msg_ids))
    if keys:
        conn.execute(
            "UPDATE workers.processed_jobs SET lease_expires_at = clock_timestamp()"
            " + make_interval(secs => %s), updated_at = clock_timestamp()"
            " WHERE job_key = ANY(%s) AND worker_id = %s AND status = 'processing'",
            (lease_s, list(keys), worker_id))


# --- dead letters ------------------------------------------------------------------------

def dead_letter(conn: Conn, *, queue: str, worker_id: str, letters: Iterable[DeadLetter]) -> None:
    """Move messages to ``workers.dead_letters``, mark their keys dead, delete them."""
    letters = list(letters)
    if not letters:
        return
    conn.execute(
        "INSERT INTO workers.dead_letters (queue_name, msg_id, job_key, message, error,"
        " error_type, attempts, worker_id)"
        " SELECT %s, m, k, b, e, t, a, %s FROM unnest(%s::bigint[], %s::text[], %s::jsonb[],"
        " %s::text[], %s::text[], %s::int[]) AS d(m, k, b, e, t, a)",
        (queue, worker_id, [d.msg_id for d in letters], [d.job_key for d in letters],
         [Jsonb(d.body) for d in letters], [d.error for d in letters],
         [d.error_type for d in letters], [d.attempts for d in letters]))
    keys = [d.job_key for d in letters if d.job_key]
    if keys:
        conn.execute(
            "UPDATE workers.processed_jobs p SET status = 'dead', last_error = d.e,"
            " lease_expires_at = NULL, completed_at = NULL, updated_at = clock_timestamp()"
            " FROM unnest(%s::text[], %s::text[]) AS d(k, e)"
            " WHERE p.job_key = d.k AND p.status <> 'dead'",
            (keys, [d.error for d in letters if d.job_key]))
    delete_messages(conn, queue, [d.msg_id for d in letters])


# --- heartbeats --------------------------------------------------------------------------

_HEARTBEAT = """
INSERT INTO workers.heartbeats AS h
    (worker_id, worker_name, queue_name, status, hostname, pid, version, git_sha, started_at,
     last_heartbeat_at, stopped_at, jobs_processed, jobs_failed, rss_bytes, metadata)
VALUES (%(worker_id)s, %(worker_name)s, %(queue_name)s, %(status)s, %(hostname)s, %(pid)s,
        %(version)s, %(git_sha)s, %(started_at)s, clock_timestamp(),
        CASE WHEN %(status)s IN ('STOPPED', 'CRASHED') THEN clock_timestamp() END,
        %(jobs_processed)s, %(jobs_failed)s, %(rss_bytes)s, %(metadata)s)
ON CONFLICT (worker_id) DO UPDATE
SET status = EXCLUDED.status, last_heartbeat_at = EXCLUDED.last_heartbeat_at,
    stopped_at = EXCLUDED.stopped_at, jobs_processed = EXCLUDED.jobs_processed,
    jobs_failed = EXCLUDED.jobs_failed, rss_bytes = EXCLUDED.rss_bytes,
    metadata = EXCLUDED.metadata
"""


def upsert_heartbeat(conn: Conn, row: dict[str, Any]) -> None:
    conn.execute(_HEARTBEAT, {**row, "metadata": Jsonb(row.get("metadata") or {})})


# --- retention ---------------------------------------------------------------------------

_PRUNE_LOCK = 7_310_412_002


def prune(conn: Conn, *, ledger_days: float, heartbeat_days: float, limit: int = 10000
          ) -> tuple[int, int] | None:
    """Delete old completed ledger rows and old stopped heartbeats; None when another
    replica is pruning right now."""
    with conn.transaction():
        row = conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS ok", (_PRUNE_LOCK,)).fetchone()
        if not row or not row["ok"]:
            return None
        ledger = conn.execute(
            "DELETE FROM workers.processed_jobs WHERE job_key IN (SELECT job_key"
            " FROM workers.processed_jobs WHERE status = 'completed' AND completed_at"
            " < clock_timestamp() - make_interval(secs => %s) LIMIT %s)",
            (ledger_days * 86400, limit)).rowcount
        beats = conn.execute(
            "DELETE FROM workers.heartbeats WHERE stopped_at IS NOT NULL AND stopped_at"
            " < clock_timestamp() - make_interval(secs => %s)", (heartbeat_days * 86400,)).rowcount
    return ledger, beats
