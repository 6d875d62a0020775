"""Every SQL statement of the inspector, as thin named functions.

The report reads one section per query inside a single read-only snapshot (see
``report.build_report``), so every age is measured against the same ``now()``: the
database's clock, never the operator's laptop. pgmq is read only through what 1.4.4 has
(``list_queues`` and the ``pgmq.q_<queue>`` tables), by column name.

``replay`` (and ``replay_dead_letter``) and ``discard`` are the only statements that write,
each bounded by the ``--timeout`` of its command.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from backend.db.ledger import LedgerStatus
from backend.db.queries import execute_bounded

# A dead letter neither replayed nor discarded: one that weighs on the verdict.
_OPEN = "replayed_at IS NULL AND discarded_at IS NULL"
# Literals, not parameters: the partial index on processing claims serves only a query
# whose text names the status.
_PROCESSING, _FAILED, _DEAD = LedgerStatus.PROCESSING.sql, LedgerStatus.FAILED.sql, LedgerStatus.DEAD.sql

Conn = psycopg.Connection[Any]
Row = dict[str, Any]

# Verdicts, problems first: the order of the workers table.
VERDICTS = ("dead", "frozen", "stale", "alive", "crashed", "stopped")

# Every heartbeat row with its verdict and whether it is history (not alive, and last
# seen before the --since window). Parameters: stale, dead (seconds), since (seconds).
#
# A worker's pool sessions carry its worker id as application_name, so pg_stat_activity
# tells a killed process (its sessions closed with it: dead once its heartbeat is two of
# its intervals late) from a frozen one (SIGSTOP, a stalled container, a network cut: its
# sessions stay open while its heartbeat is late, or one sits idle in transaction, or
# blocks others, for longer than its visibility timeout). Where its sessions do not show
# under its worker id (behind the transaction pooler, or a pooler that names the server's
# sessions itself: the worker says so in its heartbeat, `named_sessions`; older rows by
# `pooled`) only the heartbeat's age counts.
_CLASSIFIED = """
WITH blockers AS (  -- asked only of the sessions waiting for a lock: usually none
    SELECT DISTINCT unnest(pg_blocking_pids(pid)) AS pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'
), activity AS (
    SELECT a.application_name, a.pid, a.state,
           extract(epoch FROM now() - a.state_change)::float8 AS state_s,
           (a.pid IN (SELECT pid FROM blockers))::int AS blocking
    FROM pg_stat_activity AS a
    WHERE a.application_name <> '' AND a.pid <> pg_backend_pid()
), sessions AS (
    SELECT application_name AS worker_id, count(*) AS sessions,
           max(state_s) FILTER (WHERE state LIKE 'idle in transaction%%') AS idle_tx_s,
           max(state_s) FILTER (WHERE blocking > 0) AS blocking_s,
           (array_agg(pid ORDER BY (state LIKE 'idle in transaction%%' OR blocking > 0) DESC,
                      state_s DESC))[1] AS session_pid
    FROM activity GROUP BY application_name
), aged AS (
    SELECT h.*, greatest(0, extract(epoch FROM now() - h.last_heartbeat_at))::float8 AS age_s,
           coalesce(s.sessions, 0) AS sessions, s.idle_tx_s, s.blocking_s, s.session_pid,
           -- Two heartbeat intervals, at least 5 s: a busy machine may delay one beat a little.
           greatest(2 * coalesce((h.metadata ->> 'heartbeat_interval_s')::float8, 30), 5) AS late_s,
           coalesce((h.metadata ->> 'visibility_timeout_s')::float8, 30) AS visibility_s,
           coalesce(NOT (h.metadata ->> 'named_sessions')::boolean, (h.metadata ->> 'pooled')::boolean,
                    h.metadata ->> 'heartbeat_interval_s' IS NULL) AS pooled,
           coalesce((h.metadata ->> 'named_sessions')::boolean, false) AS named
    FROM workers.heartbeats h LEFT JOIN sessions s ON s.worker_id = left(h.worker_id, 63)
), classified AS (
    SELECT aged.*,
           CASE WHEN status = 'STOPPED' THEN 'stopped'
                WHEN status = 'CRASHED' THEN 'crashed'
                WHEN NOT pooled AND sessions > 0
                     AND (age_s > late_s OR idle_tx_s > visibility_s OR blocking_s > visibility_s)
                     THEN 'frozen'
                WHEN age_s > %(dead)s THEN 'dead'
                -- No session left: killed, at once, unless the server restarted since its
                -- last heartbeat (every session ended, the workers reconnecting): the
                -- checkpointer starts again with every restart, crash recovery included.
                WHEN NOT pooled AND sessions = 0
                     AND (age_s > late_s OR named AND (SELECT min(backend_start) FROM pg_stat_activity
                                             WHERE backend_type = 'checkpointer') < last_heartbeat_at)
                     THEN 'dead'
                WHEN age_s > %(stale)s THEN 'stale'
                ELSE 'alive' END AS verdict
    FROM aged
), judged AS (
    SELECT classified.*,
           (verdict IN ('stopped', 'crashed', 'dead')
            AND coalesce(stopped_at, last_heartbeat_at)
                < now() - make_interval(secs => %(since)s)) AS historic
    FROM classified
)
"""


def snapshot_start(conn: Conn, statement_timeout_s: float) -> Any:
    """Bound every statement of the current transaction, and every pause between them;
    return its ``now()``. An inspector stopped mid-report (Ctrl-Z) would otherwise keep its
    table locks, behind which a migration's exclusive lock, and every worker behind that,
    would queue."""
    row = conn.execute(
        "SELECT now() AS now, set_config('statement_timeout', %(ms)s, true) AS timeout,"
        " set_config('idle_in_transaction_session_timeout', %(ms)s, true) AS idle",
        {"ms": f"{int(statement_timeout_s * 1000)}ms"},
    ).fetchone()
    assert row is not None
    return row["now"]


def worker_rows(
    conn: Conn, *, stale_s: float, dead_s: float, since_s: float, include_historic: bool
) -> list[Row]:
    """Heartbeat rows with ``verdict``, ``age_s`` and ``historic``; history only on demand."""
    query = (
        _CLASSIFIED
        + """
    SELECT worker_id, worker_name, queue_name, status, verdict, age_s, historic, hostname, pid,
           version, git_sha, started_at, last_heartbeat_at, stopped_at, jobs_processed,
           jobs_failed, rss_bytes, metadata ->> 'RAILWAY_REPLICA_ID' AS replica_id,
           metadata ->> 'error_type' AS error_type, metadata ->> 'error' AS error,
           metadata -> 'heartbeat_interval_s' AS heartbeat_interval_s,
           metadata -> 'job_timeout_s' AS job_timeout_s, metadata -> 'job' AS job,
           sessions, idle_tx_s, blocking_s, session_pid
    FROM judged
    WHERE %(include_historic)s OR NOT historic
    ORDER BY array_position(ARRAY['dead', 'frozen', 'stale', 'alive', 'crashed', 'stopped'], verdict),
             worker_name, last_heartbeat_at DESC
    """
    )
    params = {"stale": stale_s, "dead": dead_s, "since": since_s, "include_historic": include_historic}
    return conn.execute(query, params).fetchall()


def worker_counts(conn: Conn, *, stale_s: float, dead_s: float, since_s: float) -> list[Row]:
    """Counts of heartbeat rows per (queue_name, verdict, historic), over every row."""
    query = (
        _CLASSIFIED
        + """
    SELECT queue_name, verdict, historic, count(*) AS count
    FROM judged GROUP BY queue_name, verdict, historic
    """
    )
    return conn.execute(query, {"stale": stale_s, "dead": dead_s, "since": since_s}).fetchall()


def queue_names(conn: Conn) -> list[str]:
    """Every pgmq queue, by name."""
    rows = conn.execute("SELECT queue_name FROM pgmq.list_queues() ORDER BY queue_name")
    return [r["queue_name"] for r in rows.fetchall()]


def queue_stats(conn: Conn, names: Sequence[str]) -> list[Row]:
    """Depth, visible, in-flight (read, invisible), delayed (never read, invisible) and the
    oldest message of each queue, in one statement over the queue tables."""
    if not names:
        return []
    part = sql.SQL(
        "SELECT {name}::text AS queue_name, count(*) AS depth,"
        " count(*) FILTER (WHERE vt <= now()) AS visible,"
        " count(*) FILTER (WHERE vt > now() AND read_ct > 0) AS in_flight,"
        " count(*) FILTER (WHERE vt > now() AND read_ct = 0) AS delayed,"
        " min(enqueued_at) AS oldest_enqueued_at,"
        " extract(epoch FROM now() - min(enqueued_at))::float8 AS oldest_age_s"
        " FROM {table}"
    )
    query = sql.SQL(" UNION ALL ").join(
        part.format(name=sql.Literal(name), table=sql.Identifier("pgmq", f"q_{name}")) for name in names
    )
    return conn.execute(query).fetchall()


def stuck_claims(conn: Conn, limit: int) -> tuple[int, list[Row]]:
    """Count every ``processing`` claim whose lease expired (or was never set); list the
    ``limit`` longest stuck."""
    rows = conn.execute(
        f"""
        WITH stuck AS (
            SELECT job_key, queue_name, msg_id, worker_id, attempts, lease_expires_at,
                   extract(epoch FROM now() - lease_expires_at)::float8 AS age_s
            FROM workers.processed_jobs
            WHERE status = {_PROCESSING} AND (lease_expires_at < now() OR lease_expires_at IS NULL)
        )
        SELECT c.total, s.*
        FROM (SELECT count(*) AS total FROM stuck) c
        LEFT JOIN LATERAL (
            SELECT * FROM stuck ORDER BY lease_expires_at NULLS FIRST, job_key LIMIT %(limit)s
        ) s ON true
        """,
        {"limit": limit},
    ).fetchall()
    total = int(rows[0]["total"]) if rows else 0
    items = [r for r in rows if r["job_key"] is not None]
    for item in items:
        del item["total"]
    return total, items


def dead_letter_counts(conn: Conn) -> list[Row]:
    """Unreplayed dead letters per queue, with the oldest, the newest (its key and error), and
    how many of each error type (what went wrong: ``AttemptsExhausted``, ``PayloadTooLarge``, ...)."""
    return conn.execute(
        "SELECT g.*, n.job_key AS newest_key, n.error AS newest_error FROM"
        " (SELECT queue_name, sum(n)::bigint AS count, min(oldest) AS oldest_dead_at,"
        " max(newest) AS newest_dead_at, jsonb_object_agg(error_type, n) AS error_types"
        " FROM (SELECT queue_name, error_type, count(*) AS n, min(dead_at) AS oldest,"
        f" max(dead_at) AS newest FROM workers.dead_letters WHERE {_OPEN}"
        " GROUP BY queue_name, error_type) AS t GROUP BY queue_name) AS g"
        " CROSS JOIN LATERAL (SELECT job_key, error FROM workers.dead_letters AS d"
        f" WHERE d.queue_name = g.queue_name AND {_OPEN} ORDER BY dead_at DESC LIMIT 1) AS n"
        " ORDER BY g.queue_name"
    ).fetchall()


def list_dead_letters(
    conn: Conn, *, queue: str | None, limit: int, include_replayed: bool
) -> tuple[int, list[Row]]:
    """The newest dead letters (unreplayed unless asked), with their bodies and pgmq headers,
    and how many match in all."""
    where = f" WHERE (%(queue)s::text IS NULL OR queue_name = %(queue)s) AND (%(replayed)s OR ({_OPEN}))"
    params = {"queue": queue, "replayed": include_replayed, "limit": limit}
    total = conn.execute("SELECT count(*) AS total FROM workers.dead_letters" + where, params).fetchone()
    rows = conn.execute(
        "SELECT id, queue_name, msg_id, job_key, error, error_type, attempts, worker_id,"
        " dead_at, replayed_at, discarded_at, discard_reason, message::text AS message,"
        " (SELECT nullif(to_jsonb(d) -> 'headers', 'null')::text) AS headers"  # as ``_REPLAY`` reads them
        " FROM workers.dead_letters AS d" + where + " ORDER BY id DESC LIMIT %(limit)s",
        params,
    ).fetchall()
    letters = [{**r, "message": _decoded(r["message"]), "headers": _decoded(r["headers"])} for r in rows]
    return int(total["total"]) if total else 0, letters


def _decoded(text: str | None) -> Any:
    """A letter's body as JSON, or as its text when Python's decoder rejects it (nesting
    deeper than its recursion limit, a number too long): those are letters too."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def open_letter_ids(conn: Conn, queue: str) -> list[int]:
    """Ids of the queue's open dead letters (neither replayed nor discarded), oldest first."""
    rows = conn.execute(
        f"SELECT id FROM workers.dead_letters WHERE queue_name = %s AND {_OPEN} ORDER BY id",
        (queue,),
    ).fetchall()
    return [int(r["id"]) for r in rows]


def dead_letter(conn: Conn, dead_letter_id: int) -> Row | None:
    """One dead letter's identity and state, or None when there is no such id."""
    return conn.execute(
        "SELECT id, queue_name, job_key, replayed_at, discarded_at FROM workers.dead_letters WHERE id = %s",
        (dead_letter_id,),
    ).fetchone()


@dataclass(frozen=True, kw_only=True)
class Replay:
    """What replaying one dead letter did."""

    dead_letter_id: int
    queue_name: str
    job_key: str | None
    msg_id: int
    ledger_reset: bool


# One statement, sent with its bound (``execute_bounded``): the server commits it without a
# round trip to the inspector, so an operator's inspector stopped mid-replay (Ctrl-Z, a
# dropped SSH session) never keeps the letter or the key's ledger row locked, where a
# worker's claim of that key would wait; and a statement held up by a lock ends at the bound.
# The letter's headers are read through ``to_jsonb``: null before migration 0010 added them.
_REPLAY = f"""
WITH letter AS (
    SELECT id, queue_name, job_key, message, nullif(to_jsonb(d) -> 'headers', 'null') AS headers
    FROM workers.dead_letters AS d WHERE id = %(id)s AND {_OPEN} FOR UPDATE
), sent AS (
    SELECT pgmq.send(queue_name, coalesce(message, 'null'::jsonb), {{headers}}0::integer) AS msg_id
    FROM letter
), marked AS (
    UPDATE workers.dead_letters AS d SET replayed_at = clock_timestamp() FROM letter WHERE d.id = letter.id
), reset AS (
    UPDATE workers.processed_jobs AS p SET status = {_FAILED}, attempts = 0, lease_expires_at = NULL,
           updated_at = clock_timestamp()
    FROM letter WHERE p.queue_name = letter.queue_name AND p.job_key = letter.job_key
      AND p.status IN ({_DEAD}, {_FAILED})
    RETURNING 1
)
SELECT letter.queue_name, letter.job_key, sent.msg_id, EXISTS (SELECT 1 FROM reset) AS ledger_reset
FROM letter, sent
"""
# The bound of a write when the caller gives none: the default of the inspector's --timeout.
WRITE_LIMIT_MS = 10_000


def replay(conn: Conn, dead_letter_id: int, *, limit_ms: int = WRITE_LIMIT_MS) -> Replay | None:
    """Re-send a dead letter's original body (and pgmq headers) to its queue, in one transaction with marking
    it replayed and giving its job a fresh attempt budget; bounded by ``limit_ms``.

    Returns None when the letter does not exist or was already replayed (so a second
    replay does nothing). The row lock makes two concurrent replays send once. The ledger
    is reset only from ``dead`` or ``failed``: a ``completed`` key must stay completed (the
    worker then deletes the message without running it again) and a ``processing`` claim
    belongs to a live delivery. ``conn`` must be in autocommit mode.
    """
    # pgmq 1.5 and later send headers; an older server gets the body alone.
    with_headers = conn.execute(
        "SELECT to_regprocedure('pgmq.send(text,jsonb,jsonb,integer)') IS NOT NULL AS ok"
    ).fetchone()
    sql = _REPLAY.format(headers="headers, " if with_headers and with_headers["ok"] else "")
    row = execute_bounded(conn, sql, {"id": dead_letter_id}, limit_ms=limit_ms).fetchone()
    if row is None:
        return None
    return Replay(
        dead_letter_id=dead_letter_id,
        queue_name=row["queue_name"],
        job_key=row["job_key"],
        msg_id=int(row["msg_id"]),
        ledger_reset=bool(row["ledger_reset"]),
    )


def replay_dead_letter(conn: Conn, dead_letter_id: int) -> int | None:
    """Replay one dead letter (see ``replay``); the new pgmq msg_id, or None if skipped."""
    done = replay(conn, dead_letter_id)
    return done.msg_id if done else None


def discard(conn: Conn, dead_letter_id: int, reason: str, *, limit_ms: int = WRITE_LIMIT_MS) -> bool:
    """Close an open dead letter without replaying it; False when it was not open. One
    statement, bounded by ``limit_ms`` as ``replay`` is."""
    row = execute_bounded(
        conn,
        "UPDATE workers.dead_letters SET discarded_at = clock_timestamp(), discard_reason = %(reason)s"
        f" WHERE id = %(id)s AND {_OPEN} RETURNING id",
        {"reason": reason or None, "id": dead_letter_id},
        limit_ms=limit_ms,
    ).fetchone()
    return row is not None
