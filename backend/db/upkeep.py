"""Heartbeats and retention, as thin named functions."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from backend.db import locks
from backend.db import queries as q
from backend.db.ledger import LedgerStatus

Conn = psycopg.Connection[Any]


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
    """Write the worker's heartbeat row (``stopped_at`` set when it is STOPPED or CRASHED).

    One autocommit statement, no transaction to bound: the server commits it whatever
    becomes of the worker, and the only row it locks is the worker's own."""
    conn.execute(_HEARTBEAT, {**row, "metadata": Jsonb(row.get("metadata") or {})})


# --- retention ---------------------------------------------------------------------------

PRUNE_CHUNK = 5000  # ledger rows per transaction: a few milliseconds of locks each

# One chunk of a pass is one statement, sent with its bound in one message
# (``queries.execute_bounded``), so the server runs and commits it without a round trip to
# the worker. Were it a transaction the worker drives statement by statement, a worker frozen
# (SIGSTOP, a stalled container) or cut off inside it would keep up to ``PRUNE_CHUNK`` ledger
# rows locked, and the prune lock, until the server ended it; and a healthy replica claiming
# one of those keys (an old job enqueued again) waits on the row lock: the claim is an
# upsert, it cannot skip the row. Its batch then ends at its own bound and starts over
# behind the same lock, ahead of every newer message. As one statement, the rows are
# deleted and committed by the time the worker could stop, and the bound only ends a chunk
# that waits on a lock or runs long. The prune lock is taken with ``try``: a replica never
# waits for another's pass. The first chunk of a pass also prunes the small tables.
_PRUNE_CHUNK_SQL = f"""
WITH lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(%(lock)s) AS ok),
ledger AS (
    DELETE FROM workers.processed_jobs WHERE (queue_name, job_key) IN (
        SELECT queue_name, job_key FROM workers.processed_jobs
        WHERE (SELECT ok FROM lock) AND status = {LedgerStatus.COMPLETED.sql}
          AND completed_at < clock_timestamp() - make_interval(secs => %(ledger_s)s)
        LIMIT %(chunk)s FOR UPDATE SKIP LOCKED)
    RETURNING 1
), beats AS (
    DELETE FROM workers.heartbeats WHERE %(small)s AND (SELECT ok FROM lock)
        AND stopped_at < clock_timestamp() - make_interval(secs => %(heartbeat_s)s)
    RETURNING 1
), samples AS (
    DELETE FROM workers.queue_samples WHERE %(small)s AND (SELECT ok FROM lock)
        AND sampled_at < clock_timestamp() - make_interval(secs => %(heartbeat_s)s)
), letters AS (
    DELETE FROM workers.dead_letters WHERE %(small)s AND (SELECT ok FROM lock)
        AND (replayed_at IS NOT NULL OR discarded_at IS NOT NULL)
        AND coalesce(replayed_at, discarded_at) < clock_timestamp() - make_interval(secs => %(ledger_s)s)
    RETURNING 1
)
SELECT (SELECT ok FROM lock) AS ok, (SELECT count(*) FROM ledger) AS ledger_rows,
       (SELECT count(*) FROM beats) AS heartbeat_rows, (SELECT count(*) FROM letters) AS dead_letter_rows
"""


@dataclass
class Pruned:
    """What one call of ``prune`` deleted, and whether it left nothing old behind."""

    ledger_rows: int = 0
    heartbeat_rows: int = 0
    dead_letter_rows: int = 0
    done: bool = True


def prune(
    conn: Conn,
    *,
    ledger_days: float,
    heartbeat_days: float,
    chunk: int = PRUNE_CHUNK,
    budget_s: float = 1.0,
    limit_ms: int = q.MAINTENANCE_LIMIT_MS,
    clock: Callable[[], float] = time.monotonic,
) -> Pruned | None:
    """Delete completed ledger rows older than ``ledger_days`` in chunks of ``chunk``, each
    one statement in a transaction of its own bounded by ``limit_ms``, until none is left or
    ``budget_s`` is spent (then ``done`` is False: call again soon); and, in the first chunk,
    old stopped heartbeats, old queue samples and dead letters replayed or discarded longer
    than ``ledger_days`` ago. None when another replica is pruning right now (one replica at
    a time, under a transaction's advisory lock). ``conn`` must be in autocommit mode."""
    out = Pruned()
    started = clock()
    params = {"lock": locks.RETENTION, "ledger_s": ledger_days * 86400, "heartbeat_s": heartbeat_days * 86400}
    first = True
    while True:
        row = q.execute_bounded(
            conn, _PRUNE_CHUNK_SQL, {**params, "chunk": chunk, "small": first}, limit_ms=limit_ms
        ).fetchone()
        if not row or not row["ok"]:
            if first:
                return None
            out.done = False
            return out
        deleted = int(row["ledger_rows"])
        out.ledger_rows += deleted
        if first:
            out.heartbeat_rows, out.dead_letter_rows = (
                int(row["heartbeat_rows"]),
                int(row["dead_letter_rows"]),
            )
        first = False
        if deleted < chunk:
            return out
        if clock() - started >= budget_s:
            out.done = False
            return out


def previous_instance(conn: Conn, queue: str, worker_id: str, replica: str) -> dict[str, Any] | None:
    """The last instance of ``queue``'s worker on ``replica`` (Railway's replica id, else the
    host) before ``worker_id``: how it ended, for the new instance's WORKER_BOOT."""
    row = conn.execute(
        "SELECT worker_id, status, status = 'STOPPED' AS clean, started_at,"
        " round(extract(epoch FROM clock_timestamp() - last_heartbeat_at)::numeric, 1)::float8"
        " AS heartbeat_age_s, jobs_processed,"
        " round(greatest(rss_bytes, (metadata ->> 'peak_rss_bytes')::bigint) / 1048576.0, 1)::float8"
        " AS peak_rss_mb, metadata ->> 'error_type' AS error_type, metadata ->> 'error' AS error"
        " FROM workers.heartbeats WHERE queue_name = %s AND worker_id <> %s"
        " AND coalesce(metadata ->> 'RAILWAY_REPLICA_ID', hostname) = %s"
        " ORDER BY started_at DESC LIMIT 1",
        (queue, worker_id, replica),
    ).fetchone()
    if row is None:
        return None
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
