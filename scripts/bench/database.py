"""The bench's server and its own connection: a fresh embedded PostgreSQL with
pg_stat_statements, the role whose statements are counted, queue fills, and what the
workers left behind (the ledger, the heartbeats, the statements)."""

from __future__ import annotations

import time
import uuid
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from backend.config import QUEUES
from backend.db.embedded import EmbeddedPostgres
from backend.db.migrate import apply_migrations
from scripts.bench.plan import BASE_QUEUE, BENCH_QUEUE, COUNTED_ROLE, ORG
from scripts.harness.process import with_password

Conn = psycopg.Connection[Any]

# One bench message body per row, built by the server: no Python JSON on the fill path.
BENCH_BODIES = """
SELECT jsonb_build_object('idempotency_key', %(tag)s::text || '-' || i, 'entity_type', 'bench',
       'entity_id', i::text, 'org_id', %(org)s::text, 'payload', '{}'::jsonb,
       'created_at', to_char(clock_timestamp() AT TIME ZONE 'UTC',
                             'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'))
FROM generate_series(%(first)s::int, %(last)s::int) AS i
"""
JUDGMENT_BODIES = """
SELECT jsonb_build_object('idempotency_key', %(tag)s::text || '-' || j, 'entity_type', 'judgment',
       'entity_id', j::text, 'org_id', %(org)s::text, 'payload', '{}'::jsonb)
FROM unnest(%(ids)s::bigint[]) WITH ORDINALITY AS u(j, i) WHERE i BETWEEN %(first)s::int AND %(last)s::int
"""


def start_embedded(pgdata: Path) -> tuple[EmbeddedPostgres, str]:
    """A fresh server with pg_stat_statements preloaded (tracking off unless a role asks)
    and no checkpoint before its shutdown.

    A bench run writes about 2 GB of WAL; with the default max_wal_size (1 GB) the server
    checkpointed every 25 to 50 s, and the full-page writes after each checkpoint slowed
    whichever runs they fell on: five bench runs' worker / baseline ratios spread over
    0.64-1.14. Without them, 0.80-1.02 in six runs (docs/BENCHMARKS.md)."""
    server = EmbeddedPostgres(pgdata)
    server.reset()
    url = server.start()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
        conn.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
        conn.execute("ALTER SYSTEM SET checkpoint_timeout = '30min'")
    server.stop()
    return server, server.start()


class BenchDatabase:
    """The bench's own connection: schema, queues, fills, and what the workers left."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        self.superuser = False
        self.counted_url: str | None = None
        self.counted_note = ""

    def prepare(self) -> None:
        apply_migrations(self.conn, queues=(*QUEUES, BENCH_QUEUE, BASE_QUEUE))
        row = self.conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        self.superuser = bool(row and row["rolsuper"])
        self.counted_url = self._counted_role()

    def _counted_role(self) -> str | None:
        """A role of its own for the workers whose statements are counted: the only role
        pg_stat_statements tracks, so the bench's own statements never mix in."""
        loaded = self.conn.execute(
            "SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'"
        ).fetchone()
        if not loaded or "pg_stat_statements" not in loaded["setting"]:
            self.counted_note = "pg_stat_statements is not in shared_preload_libraries"
            return None
        if not self.superuser:
            self.counted_note = "creating the counting role needs a superuser"
            return None
        password = uuid.uuid4().hex
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        exists = self.conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (COUNTED_ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        self.conn.execute(f"{verb} ROLE {COUNTED_ROLE} LOGIN SUPERUSER PASSWORD '{password}'")
        self.conn.execute(f"ALTER ROLE {COUNTED_ROLE} SET pg_stat_statements.track = 'top'")
        return with_password(self.url, password, user=COUNTED_ROLE)

    def reset(self, *queues: str) -> None:
        """Empty the ledger, the heartbeats and the given queues."""
        self.conn.execute("TRUNCATE workers.processed_jobs, workers.heartbeats")
        for queue in queues:
            self.conn.execute(f'TRUNCATE pgmq."q_{queue}", pgmq."a_{queue}"')

    def fill(self, queue: str, bodies_sql: str, params: dict[str, Any], count: int) -> float:
        """Send ``count`` bodies with ``pgmq.send_batch``, visible at once; return seconds.

        pgmq's insert-notification trigger updates one throttle row per message, which makes
        a large batch in one transaction quadratic (50,000 messages: minutes). A superuser
        fill skips triggers for its own transaction and wakes listeners with one NOTIFY;
        otherwise it sends small transactions.
        """
        started = time.perf_counter()
        step = count if self.superuser else 200
        sql = f"SELECT count(*) AS n FROM pgmq.send_batch(%(queue)s, ARRAY({bodies_sql}))"
        for first in range(1, count + 1, step):
            with self.conn.transaction():
                if self.superuser:
                    self.conn.execute("SET LOCAL session_replication_role = replica")
                self.conn.execute(
                    sql, {**params, "queue": queue, "first": first, "last": min(count, first + step - 1)}
                )
        self.conn.execute("SELECT pg_notify(%s, NULL)", (f"pgmq.q_{queue}.INSERT",))
        return time.perf_counter() - started

    def fill_bench(self, queue: str, count: int, tag: str) -> float:
        return self.fill(queue, BENCH_BODIES, {"tag": tag, "org": ORG}, count)

    def processed(self, worker_id: str) -> int:
        row = self.conn.execute(
            "SELECT jobs_processed FROM workers.heartbeats WHERE worker_id = %s", (worker_id,)
        ).fetchone()
        return int(row["jobs_processed"]) if row else 0

    def ledger_span(self, queue: str) -> tuple[int, float]:
        """Completed jobs of ``queue`` and seconds from the first completion to the last."""
        row = self.conn.execute(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM max(completed_at)"
            " - min(completed_at)), 0)::float8 AS span FROM workers.processed_jobs"
            " WHERE queue_name = %s AND status = 'completed'",
            (queue,),
        ).fetchone()
        assert row is not None
        return int(row["n"]), float(row["span"])

    def statements(self) -> dict[str, tuple[int, float]]:
        """Calls and execution milliseconds per statement text of the counted role so far."""
        rows = self.conn.execute(
            "SELECT s.query, sum(s.calls)::bigint AS calls, sum(s.total_exec_time)::float8 AS ms"
            " FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = %s"
            " GROUP BY s.query",
            (COUNTED_ROLE,),
        ).fetchall()
        return {r["query"]: (int(r["calls"]), float(r["ms"])) for r in rows}

    def server_version(self) -> str:
        row = self.conn.execute(
            "SELECT current_setting('server_version') AS v,"
            " (SELECT extversion FROM pg_extension WHERE extname = 'pgmq') AS pgmq"
        ).fetchone()
        assert row is not None
        if row["pgmq"]:
            return f"PostgreSQL {row['v']}, pgmq {row['pgmq']}"
        return f"PostgreSQL {row['v']}, pgmq SQL install (pgmq package {package_version('pgmq')})"


def statement_delta(
    before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    """Calls and milliseconds per statement between two ``BenchDatabase.statements``."""
    out = {}
    for query, (calls, ms) in after.items():
        calls0, ms0 = before.get(query, (0, 0.0))
        if calls > calls0:
            out[query] = (calls - calls0, ms - ms0)
    return out
