"""Every SQL statement of the worker runtime, as thin named functions.

pgmq is used through what 1.4.4 has (``send``, ``metrics``) and through its queue tables'
columns that every version has (``msg_id``, ``read_ct``, ``vt``, ``message``): messages are
taken with pgmq's ``read`` written as one statement against the queue table (with the size
check on the server), and deletions and visibility changes are one set-based statement
each. Timestamps come from ``clock_timestamp()``: the moment of the change, not the start
of a long transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]


@dataclass(frozen=True, kw_only=True)
class Message:
    """One delivery of a pgmq message: its body's JSON text, unless over the size limit
    (then only a prefix of it), the text's size in bytes, and whether an earlier delivery
    ended without an outcome (its worker died, froze or was cut off; or it failed and is
    retried): such a message runs alone, its attempt counted first."""

    msg_id: int
    text: str | None
    size: int
    delivered_before: bool

    def too_large(self, max_bytes: int) -> bool:
        return self.size > max_bytes


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


# --- pgmq -------------------------------------------------------------------------------


def queue_table(queue: str) -> str:
    """The quoted name of ``queue``'s pgmq table (pgmq lowercases queue names)."""
    return 'pgmq."q_' + queue.lower().replace('"', '""') + '"'


_BOUND = (
    "SELECT set_config('idle_in_transaction_session_timeout', %(ms)s, true),"
    " set_config('statement_timeout', %(ms)s, true)"
)
# How much of an oversized body is fetched, to name it in the dead letter.
PREFIX_CHARS = 200
# The body as text, once, and its size: the size is checked on the server, so an oversized
# body never reaches the worker. OFFSET 0 keeps the planner from inlining the subquery.
_BODY = """CASE WHEN b.size <= %(max)s THEN b.text ELSE left(b.text, {prefix}) END, coalesce(b.size, 0)"""
_BODY_OF = """LATERAL (SELECT x.text, octet_length(x.text) AS size
                 FROM (SELECT {row}.message::text AS text OFFSET 0) AS x) AS b"""


@functools.cache
def _lock_sql(queue: str) -> str:
    table = queue_table(queue)
    return f"""
SELECT m.msg_id, {_BODY.format(prefix=PREFIX_CHARS)}, s.msg_id IS NOT NULL
FROM ({_BOUND}) AS bound,
     (SELECT msg_id, message FROM {table} WHERE vt <= clock_timestamp()
      ORDER BY msg_id LIMIT %(qty)s FOR UPDATE SKIP LOCKED) AS m
CROSS JOIN {_BODY_OF.format(row="m")}
LEFT JOIN (SELECT DISTINCT unnest(msg_ids) AS msg_id FROM workers.deliveries
           WHERE queue_name = %(queue)s) AS s ON s.msg_id = m.msg_id"""


def lock_messages(conn: Conn, queue: str, *, qty: int, max_bytes: int, limit_ms: int) -> list[Message]:
    """Bound this transaction (``bound_transaction``, in the same statement: it is the first
    of a batch's transaction) and lock up to ``qty`` visible messages, oldest first.

    The same selection as ``pgmq.read`` without its update: the row locks are the lease
    (every reader skips locked rows), and they end with the transaction, at once when its
    worker dies, or when the server ends the transaction of a frozen one. A message found in
    ``workers.deliveries`` was in a batch whose worker never finished it.
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            _lock_sql(queue), {"qty": qty, "max": max_bytes, "queue": queue, "ms": str(limit_ms)}
        ).fetchall()
    rows.sort()  # oldest first, as locked; sorting here costs less than on the server
    return [Message(msg_id=m, text=t, size=n, delivered_before=d) for m, t, n, d in rows]


# The commit of a delivery record need not wait for the disk: after a server crash the worst
# is a delivery uncounted, a message run in a batch as if for the first time. Local to the
# statement's own transaction, so it holds behind the transaction pooler too.
_NO_FLUSH = "no_flush AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))"


# Sent through libpq's asynchronous calls by ``workers.deliveries.DeliveryLog`` (overlapping
# the batch's claim), with the ids as an array literal: a third of the CPU of psycopg's
# adaptation, once per batch.
RECORD_DELIVERY = (
    f"WITH {_NO_FLUSH} INSERT INTO workers.deliveries (worker_id, queue_name, msg_ids)"
    " SELECT $1, $2, $3::bigint[] FROM no_flush ON CONFLICT (worker_id) DO UPDATE"
    " SET msg_ids = EXCLUDED.msg_ids, updated_at = clock_timestamp()"
).encode()
# A worker's record goes when its batch ended with an outcome it saw itself.
FORGET_DELIVERIES = b"DELETE FROM workers.deliveries WHERE worker_id = $1"


def int_array(values: Sequence[int]) -> bytes:
    """A bigint[] literal, as text."""
    return ("{" + ",".join(map(str, values)) + "}").encode()


def prune_deliveries(conn: Conn, queue: str) -> int:
    """Delete the delivery records of ``queue`` none of whose messages is left."""
    return conn.execute(
        f"DELETE FROM workers.deliveries AS d WHERE queue_name = %s AND NOT EXISTS"
        f" (SELECT 1 FROM {queue_table(queue)} AS m WHERE m.msg_id = ANY(d.msg_ids))",
        (queue,),
    ).rowcount


@functools.cache
def _fetch_sql(queue: str, by_id: bool) -> str:
    table = queue_table(queue)
    which = "msg_id = %(id)s AND vt <= clock_timestamp()" if by_id else "vt <= clock_timestamp()"
    return f"""
WITH picked AS (
    SELECT msg_id FROM {table} WHERE {which}
    ORDER BY msg_id LIMIT %(qty)s FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE {table} AS q SET vt = clock_timestamp() + make_interval(secs => %(vt)s),
           read_ct = q.read_ct + 1
    FROM picked WHERE q.msg_id = picked.msg_id
    RETURNING q.msg_id, q.read_ct, q.message
)
SELECT t.msg_id, {_BODY.format(prefix=PREFIX_CHARS)}, t.read_ct
FROM taken AS t CROSS JOIN {_BODY_OF.format(row="t")}
ORDER BY t.msg_id"""


def fetch_messages(conn: Conn, queue: str, *, qty: int, vt_s: int, max_bytes: int) -> list[Message]:
    """Take up to ``qty`` visible messages, oldest first, leased for ``vt_s`` and counted.

    One autocommit statement, pgmq's ``read`` written against the queue table: each message
    becomes invisible for ``vt_s`` (a lease that outlives the transaction and ends on its
    own) and its ``read_ct`` is incremented before any handler runs.
    """
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            _fetch_sql(queue, False), {"qty": qty, "vt": vt_s, "max": max_bytes, "id": None}
        ).fetchall()
    return [Message(msg_id=m, text=t, size=n, delivered_before=d > 1) for m, t, n, d in rows]


def take_message(conn: Conn, queue: str, msg_id: int, *, vt_s: int) -> bool:
    """Lease one message by id for ``vt_s``, as ``fetch_messages`` does; False when it is
    gone, invisible, or locked by another worker."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(_fetch_sql(queue, True), {"qty": 1, "vt": vt_s, "max": 0, "id": msg_id}).fetchall()
    return bool(rows)


@functools.cache
def _delete_sql(queue: str) -> str:
    return f"DELETE FROM {queue_table(queue)} WHERE msg_id = ANY(%b::bigint[])"


def delete_messages(conn: Conn, queue: str, msg_ids: Sequence[int]) -> None:
    if msg_ids:
        conn.execute(_delete_sql(queue), (list(msg_ids),))


_VISIBILITY_SQL = (
    "UPDATE {table} AS q SET vt = clock_timestamp() + make_interval(secs => t.d)"
    " FROM unnest(%b::bigint[], %b::int[]) AS t(m, d) WHERE q.msg_id = t.m"
)


def set_visibility(conn: Conn, queue: str, msg_ids: Sequence[int], delays_s: Sequence[int]) -> None:
    """Make each message visible again after its delay (0: at once)."""
    if msg_ids:
        conn.execute(_VISIBILITY_SQL.format(table=queue_table(queue)), (list(msg_ids), list(delays_s)))


def release_messages(conn: Conn, queue: str, msg_ids: Sequence[int]) -> None:
    """Give back messages taken but never started (a drain): visible at once, and this
    delivery uncounted, so they are not mistaken for jobs that took their worker down."""
    if msg_ids:
        conn.execute(
            f"UPDATE {queue_table(queue)} SET vt = clock_timestamp(),"
            " read_ct = greatest(read_ct - 1, 0) WHERE msg_id = ANY(%b::bigint[])",
            (list(msg_ids),),
        )


def bound_transaction(conn: Conn, limit_ms: int) -> None:
    """Bound the open transaction by the lease: no statement, and no pause between
    statements, may last longer than ``limit_ms``. The server ends a frozen, hung or
    cut-off worker's transaction after that, releasing its locks; set per transaction, so it
    holds behind the transaction pooler too."""
    conn.execute(_BOUND, {"ms": str(limit_ms)})


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
    row = conn.execute(
        "SELECT to_regclass(format('pgmq.%%I', 'q_' || %s)) IS NOT NULL AS ok", (queue,)
    ).fetchone()
    return bool(row and row["ok"])


def notifications_available(conn: Conn, queue: str) -> bool:
    """Whether inserts into ``queue`` notify: the migrations' statement-level trigger."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgmq'"
        " AND c.relname = 'q_' || %s AND t.tgname = 'workers_notify_insert') AS ok",
        (queue,),
    ).fetchone()
    return bool(row and row["ok"])


def notify_channel(queue: str) -> str:
    return f"pgmq.q_{queue}.INSERT"


# --- the ledger --------------------------------------------------------------------------

# Keys are claimed under a transaction-scoped advisory lock taken with ``try``: a key that
# another worker's open transaction is claiming or running is skipped, never waited for.
_KEY_LOCK = "pg_try_advisory_xact_lock(hashtextextended({key}, 7310412001))"

_CLAIM = f"""
INSERT INTO workers.processed_jobs AS p
    (job_key, queue_name, msg_id, status, attempts, worker_id, lease_expires_at,
     created_at, updated_at, completed_at)
SELECT k, %(queue)s, m, %(status)s, 1, %(worker)s,
       CASE WHEN %(status)s = 'processing' THEN clock_timestamp() + make_interval(secs => %(lease)s) END,
       clock_timestamp(), clock_timestamp(),
       CASE WHEN %(status)s = 'completed' THEN clock_timestamp() END
FROM unnest(%(keys)b::text[], %(ids)b::bigint[]) AS t(k, m)
-- A key with a live claim is not even try-locked: a batch that will not claim it must not
-- hold its lock until its commit, while the claim's owner waits for it to start the run.
WHERE CASE WHEN EXISTS (SELECT 1 FROM workers.processed_jobs AS l WHERE l.job_key = t.k
                        AND l.status = 'processing' AND l.lease_expires_at > clock_timestamp())
           THEN false ELSE {_KEY_LOCK.format(key="t.k")} END
ORDER BY k  -- one row lock order for every worker: no deadlocks between batches
ON CONFLICT (job_key) DO UPDATE
SET status = EXCLUDED.status, attempts = p.attempts + 1, msg_id = EXCLUDED.msg_id,
    queue_name = EXCLUDED.queue_name, worker_id = EXCLUDED.worker_id,
    lease_expires_at = EXCLUDED.lease_expires_at, completed_at = EXCLUDED.completed_at,
    updated_at = clock_timestamp()
WHERE (p.status = 'failed' AND coalesce(p.lease_expires_at <= clock_timestamp(), true))
   OR (%(status)s = 'processing' AND p.status = 'processing'
       AND p.lease_expires_at < clock_timestamp())
RETURNING p.job_key, p.attempts
"""


def claim(
    conn: Conn,
    *,
    queue: str,
    worker_id: str,
    keys: Sequence[str],
    msg_ids: Sequence[int],
    lease_s: float,
    status: str = "processing",
) -> dict[str, int]:
    """Claim each key not completed, dead, held by a live lease or by another worker's open
    transaction; return key -> attempt.

    ``processing`` commits a claim with a lease before the handler runs (external jobs, and
    transactional jobs run alone): it also takes over a claim whose lease expired, the trace
    of a worker that died in the handler. ``completed`` is for a transactional batch, whose
    claim and effects commit together or not at all; it leaves an expired claim alone, so
    such a job is run alone, with its delivery counted first.
    """
    if not keys:
        return {}
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            _CLAIM,
            {
                "queue": queue,
                "worker": worker_id,
                "lease": lease_s,
                "status": status,
                "keys": list(keys),
                "ids": list(msg_ids),
            },
        ).fetchall()
    return dict(rows)


def ledger_status(conn: Conn, keys: Sequence[str]) -> dict[str, tuple[str, float]]:
    """key -> (status, seconds left on its lease, 0 when none) for existing keys."""
    rows = conn.execute(
        "SELECT job_key, status, greatest(0, extract(epoch FROM lease_expires_at"
        " - clock_timestamp()))::float8 AS lease_left FROM workers.processed_jobs"
        " WHERE job_key = ANY(%s)",
        (list(keys),),
    ).fetchall()
    return {r["job_key"]: (r["status"], r["lease_left"] or 0.0) for r in rows}


def owns_claim(conn: Conn, key: str, worker_id: str) -> bool:
    """Lock this worker's live claim of ``key`` for this transaction; False when another
    worker took it over. Waits (within the transaction's bound) for a claim in progress."""
    row = conn.execute(
        "SELECT 1 AS ok FROM workers.processed_jobs, pg_advisory_xact_lock(hashtextextended(%(k)s,"
        " 7310412001)) WHERE job_key = %(k)s AND worker_id = %(w)s AND status = 'processing'"
        " FOR UPDATE OF processed_jobs",
        {"k": key, "w": worker_id},
    ).fetchone()
    return row is not None


def complete(conn: Conn, keys: Sequence[str]) -> None:
    if keys:
        conn.execute(
            "UPDATE workers.processed_jobs SET status = 'completed', lease_expires_at = NULL,"
            " completed_at = clock_timestamp(), updated_at = clock_timestamp()"
            " WHERE job_key = ANY(%s)",
            (list(keys),),
        )


def record_failures(conn: Conn, failures: Sequence[Failure]) -> None:
    """Mark the attempts failed. A failed key's ``lease_expires_at`` is the end of its
    backoff: no copy of the key is claimed before then (``claim``)."""
    if not failures:
        return
    conn.execute(
        "UPDATE workers.processed_jobs p SET status = 'failed', last_error = f.err,"
        " lease_expires_at = clock_timestamp() + make_interval(secs => f.d),"
        " completed_at = NULL, updated_at = clock_timestamp()"
        " FROM unnest(%s::text[], %s::text[], %s::int[]) AS f(k, err, d) WHERE p.job_key = f.k",
        ([f.job_key for f in failures], [f.error for f in failures], [f.delay_s for f in failures]),
    )


def release_claims(conn: Conn, worker_id: str, keys: Sequence[str]) -> None:
    """Expire the leases of claims this worker gives up, so the next delivery takes over."""
    if keys:
        conn.execute(
            "UPDATE workers.processed_jobs SET lease_expires_at = clock_timestamp(),"
            " updated_at = clock_timestamp() WHERE job_key = ANY(%s) AND worker_id = %s"
            " AND status = 'processing'",
            (list(keys), worker_id),
        )


def extend_leases(
    conn: Conn, *, queue: str, worker_id: str, msg_ids: Sequence[int], keys: Sequence[str], lease_s: int
) -> None:
    """Keep running external jobs invisible and their claims live for another ``lease_s``."""
    set_visibility(conn, queue, msg_ids, [lease_s] * len(msg_ids))
    if keys:
        conn.execute(
            "UPDATE workers.processed_jobs SET lease_expires_at = clock_timestamp()"
            " + make_interval(secs => %s), updated_at = clock_timestamp()"
            " WHERE job_key = ANY(%s) AND worker_id = %s AND status = 'processing'",
            (lease_s, list(keys), worker_id),
        )


# --- dead letters ------------------------------------------------------------------------


def dead_letter(conn: Conn, *, queue: str, worker_id: str, letters: Iterable[DeadLetter]) -> None:
    """Move messages to ``workers.dead_letters`` with their body exactly as queued (copied on
    the server: an oversized body never passes through the worker), mark their keys dead,
    delete them. A message already gone (another worker finished it) leaves no letter."""
    letters = list(letters)
    if not letters:
        return
    conn.execute(
        f"WITH moved AS (INSERT INTO workers.dead_letters (queue_name, msg_id, job_key, message,"
        " error, error_type, attempts, worker_id)"
        " SELECT %(queue)s, d.m, d.k, q.message, d.e, d.t, d.a, %(worker)s"
        " FROM unnest(%(ids)s::bigint[], %(keys)s::text[], %(errors)s::text[], %(types)s::text[],"
        f" %(attempts)s::int[]) AS d(m, k, e, t, a) JOIN {queue_table(queue)} AS q ON q.msg_id = d.m"
        " RETURNING job_key, error)"
        " UPDATE workers.processed_jobs p SET status = 'dead', last_error = moved.error,"
        " lease_expires_at = NULL, completed_at = NULL, updated_at = clock_timestamp()"
        " FROM moved WHERE p.job_key = moved.job_key AND p.status <> 'dead'",
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


def prune(
    conn: Conn, *, ledger_days: float, heartbeat_days: float, limit: int = 10000
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
            (ledger_days * 86400, limit),
        ).rowcount
        beats = conn.execute(
            "DELETE FROM workers.heartbeats WHERE stopped_at IS NOT NULL AND stopped_at"
            " < clock_timestamp() - make_interval(secs => %s)",
            (heartbeat_days * 86400,),
        ).rowcount
    return ledger, beats
