"""Heartbeats and retention, as thin named functions."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

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
    """Write the worker's heartbeat row (``stopped_at`` set when it is STOPPED or CRASHED)."""
    conn.execute(_HEARTBEAT, {**row, "metadata": Jsonb(row.get("metadata") or {})})


# --- retention ---------------------------------------------------------------------------

_PRUNE_LOCK = 7_310_412_002
PRUNE_CHUNK = 5000  # ledger rows per transaction: a few milliseconds of locks each


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
    clock: Callable[[], float] = time.monotonic,
) -> Pruned | None:
    """Delete completed ledger rows older than ``ledger_days`` in chunks of ``chunk``, each in
    a short transaction of its own, until none is left or ``budget_s`` is spent (then
    ``done`` is False: call again soon); and, in the first chunk, old stopped heartbeats and
    dead letters replayed or discarded longer than ``ledger_days`` ago. None when another
    replica is pruning right now (one replica at a time, under a transaction's advisory lock)."""
    out = Pruned()
    started = clock()
    first = True
    while True:
        with conn.transaction():
            row = conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS ok", (_PRUNE_LOCK,)).fetchone()
            if not row or not row["ok"]:
                if first:
                    return None
                out.done = False
                return out
            deleted = conn.execute(
                "DELETE FROM workers.processed_jobs WHERE (queue_name, job_key) IN (SELECT queue_name,"
                f" job_key FROM workers.processed_jobs WHERE status = {LedgerStatus.COMPLETED.sql}"
                " AND completed_at < clock_timestamp() - make_interval(secs => %s)"
                " LIMIT %s FOR UPDATE SKIP LOCKED)",
                (ledger_days * 86400, chunk),
            ).rowcount
            if first:
                out.heartbeat_rows, out.dead_letter_rows = _prune_small_tables(
                    conn, ledger_days, heartbeat_days
                )
        out.ledger_rows += deleted
        first = False
        if deleted < chunk:
            return out
        if clock() - started >= budget_s:
            out.done = False
            return out


def _prune_small_tables(conn: Conn, ledger_days: float, heartbeat_days: float) -> tuple[int, int]:
    beats = conn.execute(
        "DELETE FROM workers.heartbeats WHERE stopped_at IS NOT NULL AND stopped_at"
        " < clock_timestamp() - make_interval(secs => %s)",
        (heartbeat_days * 86400,),
    ).rowcount
    conn.execute(
        "DELETE FROM workers.queue_samples WHERE sampled_at < clock_timestamp() - make_interval(secs => %s)",
        (heartbeat_days * 86400,),
    )
    letters = conn.execute(
        "DELETE FROM workers.dead_letters WHERE (replayed_at IS NOT NULL OR discarded_at IS NOT NULL)"
        " AND coalesce(replayed_at, discarded_at) < clock_timestamp() - make_interval(secs => %s)",
        (ledger_days * 86400,),
    ).rowcount
    return beats, letters


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
