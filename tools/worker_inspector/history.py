"""What happened over a window, for the HTML report: throughput and failures from the
ledger and the dead letters, depth and age from the queue samples, worker instances from
the heartbeat rows. Read-only, in one repeatable-read snapshot, per time bucket."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import IsolationLevel

from tools.worker_inspector.queries import Conn

# Buckets per chart: fine enough to see a spike, few enough to draw fast.
_BUCKETS = 240

Point = tuple[float, float]  # (epoch seconds, value)


@dataclass
class History:
    """Series per queue (name -> points), and the worker instances of the window."""

    since_s: float
    bucket_s: int
    start: float
    end: float
    completed: dict[str, list[Point]] = field(default_factory=dict)
    failing: dict[str, list[Point]] = field(default_factory=dict)
    dead_letters: dict[str, list[Point]] = field(default_factory=dict)
    depth: dict[str, list[Point]] = field(default_factory=dict)
    oldest_age: dict[str, list[Point]] = field(default_factory=dict)
    instances: list[dict[str, Any]] = field(default_factory=list)


def bucket_for(since_s: float) -> int:
    """Whole minutes, so that a day is 6-minute buckets and a week about 42 minutes."""
    return max(60, math.ceil(since_s / _BUCKETS / 60) * 60)


def read_history(conn: Conn, since_s: float, statement_timeout_s: float = 30.0) -> History:
    bucket = bucket_for(since_s)
    params = {"since": since_s, "b": bucket}
    slot = "date_bin(make_interval(secs => %(b)s), {col}, timestamptz '2000-01-01')"
    saved = conn.read_only, conn.isolation_level
    conn.read_only, conn.isolation_level = True, IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT extract(epoch FROM now())::float8 AS now,"
                " set_config('statement_timeout', %s, true) AS t",
                (f"{int(statement_timeout_s * 1000)}ms",),
            ).fetchone()
            assert row is not None
            now = float(row["now"])
            h = History(since_s=since_s, bucket_s=bucket, start=now - since_s, end=now)
            # One pass over the ledger for both series: it is the largest table by far.
            ledger = conn.execute(
                "SELECT queue_name AS s, date_bin(make_interval(secs => %(b)s),"
                " CASE WHEN status = 'completed' THEN completed_at ELSE updated_at END,"
                " timestamptz '2000-01-01') AS t, status = 'completed' AS done, count(*) AS v"
                " FROM workers.processed_jobs"
                " WHERE (status = 'completed' AND completed_at > now() - make_interval(secs => %(since)s))"
                " OR (status IN ('failed', 'dead') AND updated_at > now() - make_interval(secs => %(since)s))"
                " GROUP BY 1, 2, 3 ORDER BY 1, 2",
                params,
            ).fetchall()
            for r in ledger:
                series = h.completed if r["done"] else h.failing
                series.setdefault(r["s"], []).append((r["t"].timestamp(), float(r["v"])))
            h.dead_letters = _series(
                conn,
                f"SELECT queue_name AS s, {slot.format(col='dead_at')} AS t, count(*) AS v"
                " FROM workers.dead_letters WHERE dead_at > now() - make_interval(secs => %(since)s)"
                " GROUP BY 1, 2",
                params,
            )
            sampled = "workers.queue_samples WHERE sampled_at > now() - make_interval(secs => %(since)s)"
            h.depth = _series(
                conn,
                f"SELECT queue_name AS s, sampled_at AS t, depth AS v FROM {sampled}",
                params,
            )
            h.oldest_age = _series(
                conn,
                f"SELECT queue_name AS s, sampled_at AS t, coalesce(oldest_age_s, 0) AS v FROM {sampled}",
                params,
            )
            h.instances = [
                dict(r)
                for r in conn.execute(
                    "SELECT worker_id, queue_name, status, hostname, pid,"
                    " extract(epoch FROM started_at)::float8 AS started,"
                    " extract(epoch FROM coalesce(stopped_at, last_heartbeat_at))::float8 AS ended,"
                    " extract(epoch FROM now() - last_heartbeat_at)::float8 AS age_s,"
                    " metadata ->> 'error_type' AS error_type"
                    " FROM workers.heartbeats"
                    " WHERE coalesce(stopped_at, last_heartbeat_at)"
                    " > now() - make_interval(secs => %(since)s)"
                    " ORDER BY queue_name, started_at",
                    params,
                ).fetchall()
            ]
    finally:
        conn.read_only, conn.isolation_level = saved
    return h


def _series(conn: Conn, sql: str, params: dict[str, Any]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for r in conn.execute(sql + " ORDER BY 1, 2", params).fetchall():
        at: datetime = r["t"]
        out.setdefault(r["s"], []).append((at.timestamp(), float(r["v"])))
    return out
