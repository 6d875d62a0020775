"""How fast the worker inspector answers on a production-sized history.

Seeds a separate database with 10,000 heartbeat rows (mostly stopped history, some alive,
stale, dead and crashed), 100,000 ledger rows (completed, failed, dead, processing, some of
them stuck), dead letters, and 10 queues with a backlog (some of it in flight), then times:

- each report query alone, on an open connection;
- the in-process report (``build_report``) on an open connection, and with connect + render;
- the whole ``python -m tools.worker_inspector --json`` subprocess, as cron runs it.

    python -m scripts.inspector_bench [--runs 7] [--target 1.0]
    python -m scripts.inspector_bench --url postgresql://... --wipe   # a database to wipe

Without ``--url`` it starts its own embedded PostgreSQL in ``.data/inspector-bench`` (and
stops it at the end unless ``--keep-running``). Exits 1 when a median misses the target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from backend.config import QUEUES
from backend.db.connect import connect
from backend.db.embedded import EmbeddedPostgres
from backend.db.migrate import apply_migrations
from tools.worker_inspector import queries
from tools.worker_inspector.model import Options
from tools.worker_inspector.render import render_report
from tools.worker_inspector.report import build_report

ROOT = Path(__file__).resolve().parents[1]

BENCH_QUEUES = (*QUEUES, *(f"q_bench_{i}" for i in range(10 - len(QUEUES))))
PGDATA = ROOT / ".data" / "inspector-bench" / "pgdata"

# 10,000 workers: a week of restarts as history, and a few in every live verdict.
_SEED_HEARTBEATS = """
INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname, pid,
    version, git_sha, started_at, last_heartbeat_at, stopped_at, jobs_processed, jobs_failed,
    rss_bytes, metadata)
SELECT 'w-' || i, q, q, s.status, 'host-' || (i %% 7), 1000 + i, '0.1.0',
       md5(i::text), now() - make_interval(secs => s.age + 3600), now() - make_interval(secs => s.age),
       CASE WHEN s.status IN ('STOPPED', 'CRASHED') THEN now() - make_interval(secs => s.age) END,
       i * 3, i %% 5, (80 + i %% 50) * 1048576,
       jsonb_build_object('RAILWAY_REPLICA_ID', 'replica-' || (i %% 3))
FROM generate_series(1, %(n)s) AS i
CROSS JOIN LATERAL (SELECT (%(queues)s::text[])[1 + i %% cardinality(%(queues)s::text[])] AS q) qq
CROSS JOIN LATERAL (SELECT
    CASE WHEN i <= 30 THEN 'RUNNING' WHEN i <= 40 THEN 'RUNNING' WHEN i <= 50 THEN 'DRAINING'
         WHEN i <= 100 THEN 'CRASHED' ELSE 'STOPPED' END AS status,
    CASE WHEN i <= 30 THEN 5 WHEN i <= 35 THEN 600 WHEN i <= 40 THEN 172800 WHEN i <= 50 THEN 90
         ELSE (i * 61) %% (7 * 86400) END AS age) s
"""

# 100,000 ledger rows: mostly completed, some failed, dead and processing (half stuck).
_SEED_LEDGER = """
INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts, worker_id,
    lease_expires_at, last_error, created_at, updated_at, completed_at)
SELECT 'job-' || i, (%(queues)s::text[])[1 + i %% cardinality(%(queues)s::text[])], i, st,
       1 + i %% 5, 'w-' || (i %% 10000 + 1),
       CASE WHEN st = 'processing' THEN now() + make_interval(secs => CASE WHEN i %% 2 = 0
            THEN -600 ELSE 30 END) END,
       CASE WHEN st IN ('failed', 'dead') THEN 'boom' END,
       now() - make_interval(secs => i), now() - make_interval(secs => i / 2),
       CASE WHEN st = 'completed' THEN now() - make_interval(secs => i / 2) END
FROM generate_series(1, %(n)s) AS i
CROSS JOIN LATERAL (SELECT CASE WHEN i %% 100 < 90 THEN 'completed' WHEN i %% 100 < 95
    THEN 'failed' WHEN i %% 100 < 98 THEN 'dead' ELSE 'processing' END AS st) s
"""

_SEED_DEAD_LETTERS = """
INSERT INTO workers.dead_letters (queue_name, msg_id, job_key, message, error, error_type,
    attempts, worker_id, dead_at, replayed_at)
SELECT queue_name, msg_id, job_key, jsonb_build_object('idempotency_key', job_key), 'boom',
       'RuntimeError', attempts, worker_id, updated_at,
       CASE WHEN msg_id % 3 = 0 THEN updated_at END
FROM workers.processed_jobs WHERE status = 'dead'
"""


def seed(conn: psycopg.Connection[Any], *, workers: int, jobs: int, backlog: int) -> None:
    """Replace every runtime row and message with the bench's data set."""
    apply_migrations(conn, queues=BENCH_QUEUES)
    conn.execute("TRUNCATE workers.heartbeats, workers.processed_jobs, workers.dead_letters RESTART IDENTITY")
    queues = list(BENCH_QUEUES)
    for queue in queues:
        conn.execute("SELECT pgmq.purge_queue(%s)", (queue,))
    conn.execute(_SEED_HEARTBEATS, {"n": workers, "queues": queues})
    conn.execute(_SEED_LEDGER, {"n": jobs, "queues": queues})
    conn.execute(_SEED_DEAD_LETTERS)
    for queue in queues:
        conn.execute(
            "SELECT pgmq.send_batch(%s, array_agg(jsonb_build_object('idempotency_key',"
            " 'k-' || i, 'entity_type', 'judgment', 'entity_id', i::text, 'org_id', 'org-1',"
            " 'payload', '{}'::jsonb)), 0::integer) FROM generate_series(1, %s) i",
            (queue, backlog),
        )
        conn.execute("SELECT count(*) FROM pgmq.read(%s, 600, %s)", (queue, backlog // 10))
    conn.execute("ANALYZE")


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm caches and imports; not counted
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def per_query(conn: psycopg.Connection[Any], options: Options) -> dict[str, Callable[[], object]]:
    th = {"stale_s": options.stale_after_s, "dead_s": options.dead_after_s, "since_s": options.since_s}
    names = queries.queue_names(conn)
    return {
        "query workers": lambda: queries.worker_rows(conn, include_historic=False, **th),
        "query worker counts": lambda: queries.worker_counts(conn, **th),
        "query queue names": lambda: queries.queue_names(conn),
        "query queue stats": lambda: queries.queue_stats(conn, names),
        "query stuck claims": lambda: queries.stuck_claims(conn, options.stuck_limit),
        "query dead letters": lambda: queries.dead_letter_counts(conn),
    }


def subprocess_run(url: str) -> Callable[[], object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "RAILWAY_"))}
    env |= {"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": url}

    def run() -> None:
        done = subprocess.run(
            [sys.executable, "-m", "tools.worker_inspector", "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode not in (0, 1):
            raise SystemExit(f"inspector failed: {done.stderr.decode().strip()}")

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.inspector_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", help="a database to seed (wiped: needs --wipe)")
    parser.add_argument("--wipe", action="store_true", help="allow wiping --url's runtime tables")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--backlog", type=int, default=1_000, help="messages per queue")
    parser.add_argument("--target", type=float, default=1.0, help="seconds")
    parser.add_argument("--keep-running", action="store_true", help="leave the embedded server running")
    args = parser.parse_args(argv)
    if args.url and not args.wipe:
        parser.error(
            "--url's heartbeats, ledger, dead letters and queues are replaced: add --wipe to confirm"
        )
    server = None if args.url else EmbeddedPostgres(PGDATA)
    url = args.url or server.start()  # type: ignore[union-attr]
    try:
        with connect(url, "inspector-bench") as conn:
            start = time.perf_counter()
            seed(conn, workers=args.workers, jobs=args.jobs, backlog=args.backlog)
            print(
                f"seeded {args.workers} heartbeats, {args.jobs} ledger rows, "
                f"{len(BENCH_QUEUES)} queues x {args.backlog} messages "
                f"in {time.perf_counter() - start:.1f}s"
            )
            options = Options()
            report = build_report(conn, options)
            print(
                f"report: {report.verdict}, {len(report.workers)} workers shown "
                f"({report.hidden_workers} hidden), {report.stuck_total} stuck claims, "
                f"{report.dead_letter_total} dead letters, {len(report.reasons)} reasons"
            )
            results = {name: timed(fn, args.runs) for name, fn in per_query(conn, options).items()}
            results["report, open connection"] = timed(lambda: build_report(conn, options), args.runs)

        def cold() -> None:
            with connect(url, "inspector-bench") as fresh:
                render_report(build_report(fresh, options))

        results["report, connect + render"] = timed(cold, args.runs)
        results["subprocess --json"] = timed(subprocess_run(url), args.runs)
    finally:
        if server is not None and not args.keep_running:
            server.stop()
    print(f"\n{'timing (' + str(args.runs) + ' runs)':<28}{'median':>10}{'min':>10}{'max':>10}")
    for name, samples in results.items():
        print(f"{name:<28}{_ms(statistics.median(samples))}{_ms(min(samples))}{_ms(max(samples))}")
    slowest = max(statistics.median(results[k]) for k in ("report, connect + render", "subprocess --json"))
    met = slowest < args.target
    print(
        f"\ntarget: under {args.target:g}s -> {'met' if met else 'MISSED'} "
        f"(slowest median {slowest * 1000:.0f} ms)"
    )
    return 0 if met else 1


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:>8.1f}ms"


if __name__ == "__main__":
    raise SystemExit(main())
