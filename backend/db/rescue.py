"""Rescue of dead workers' claims: a live claim whose worker's process is gone is given back
at once (its message visible, its lease expired) instead of when its lease ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from backend.db.ledger import LedgerStatus
from backend.db.queries import for_queue

Conn = psycopg.Connection[Any]

_PROCESSING = LedgerStatus.PROCESSING.sql


@dataclass(frozen=True, kw_only=True)
class Rescued:
    """A live claim given back because its worker's process is gone."""

    job_key: str
    msg_id: int
    owner: str  # the worker that held it


# A worker's sessions carry its worker id as application_name (backend.db.connect), and a
# process that dies (SIGKILL, the OOM killer, a crash) closes them: a live claim of a worker
# with no session left is given back now (claim expired, message visible) instead of when
# its lease ends. A frozen worker keeps its sessions, and so does one cut off until the
# server notices: their leases run out as before.
# Sessions also end while their process lives, so a claim is given back only when:
# - the worker's heartbeat says its sessions are named by its worker id (not behind a
#   pooler that names them itself);
# - a session older than the claim's last sign of life (its claim or lease extension, or the
#   worker's heartbeat) is still connected: no crash-restart, failover or restart since
#   then, which end every session while the workers live on to reconnect;
# - the server does not end idle sessions (idle_session_timeout): a live worker's session
#   waiting on a handler outside the database would be one.
# What is left is a live worker whose own sessions were all ended (pg_terminate_backend, a
# reset of its own network): its job may be sent twice, which its key deduplicates, and it
# finds its claim taken over (JOB_CLAIM_LOST). Rows another transaction holds are skipped.
_RESCUE = f"""
WITH orphans AS (
    SELECT p.job_key FROM workers.processed_jobs AS p
    JOIN workers.heartbeats AS h ON h.worker_id = p.worker_id
    WHERE p.status = {_PROCESSING} AND p.queue_name = %(queue)s AND p.worker_id <> %(worker)s
      AND p.lease_expires_at > clock_timestamp()
      AND coalesce((h.metadata ->> 'named_sessions')::boolean, false)
      AND coalesce(current_setting('idle_session_timeout', true), '0') = '0'
      AND (SELECT min(a.backend_start) FROM pg_stat_activity AS a WHERE a.backend_type = 'client backend')
          < greatest(p.updated_at, h.last_heartbeat_at)
      AND NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.application_name = left(p.worker_id, 63))
    FOR UPDATE OF p SKIP LOCKED
), expired AS (
    UPDATE workers.processed_jobs AS p
    SET lease_expires_at = clock_timestamp(), updated_at = clock_timestamp()
    FROM orphans AS o WHERE p.queue_name = %(queue)s AND p.job_key = o.job_key
    RETURNING p.job_key, p.msg_id, p.worker_id
), visible AS (
    UPDATE {{table}} AS m SET vt = clock_timestamp()
    WHERE m.msg_id = ANY (ARRAY(SELECT e.msg_id FROM expired AS e)) AND m.vt > clock_timestamp()
)"""
_RESCUE_ORPHANS = _RESCUE + "\nSELECT job_key, msg_id, worker_id FROM expired"
_VISIBLE_OR_RESCUED = (
    _RESCUE + "\nSELECT e.job_key, e.msg_id, e.worker_id, v.ok"
    " FROM (SELECT EXISTS (SELECT 1 FROM {table} WHERE vt <= clock_timestamp()) AS ok) AS v"
    " LEFT JOIN expired AS e ON true"
)


def rescue_orphans(conn: Conn, *, queue: str, worker_id: str) -> list[Rescued]:
    """Give back the queue's live claims whose worker's process is gone (``_RESCUE``); the
    next delivery takes each over as a new attempt, counted."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            for_queue(_RESCUE_ORPHANS, queue), {"queue": queue, "worker": worker_id}
        ).fetchall()
    return [Rescued(job_key=k, msg_id=m, owner=w) for k, m, w in rows]


def visible_or_rescued(conn: Conn, *, queue: str, worker_id: str) -> tuple[bool, list[Rescued]]:
    """``rescue_orphans`` and whether a message of the queue is visible, in one statement
    (the idle worker's check: one statement per poll either way)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            for_queue(_VISIBLE_OR_RESCUED, queue), {"queue": queue, "worker": worker_id}
        ).fetchall()
    rescued = [Rescued(job_key=k, msg_id=m, owner=w) for k, m, w, _ in rows if k is not None]
    return bool(rescued) or any(ok for *_, ok in rows), rescued
