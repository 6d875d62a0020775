"""How long the HTML report takes on a week of history: 3 queues, 5,000,000 completed
ledger rows spread over 7 days, a sample per queue and minute, dead letters and worker
instances; ``python -m tools.worker_inspector report --html FILE --since 7d`` timed as a
process (start-up included), on a fresh embedded server.

    python -m scripts.report_bench [--rows 5000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from backend.db.embedded import PROJECT_ROOT, EmbeddedPostgres
from backend.db.migrate import apply_migrations

QUEUES = ("q_collectability", "q_escalation", "q_outbox_processor")


def fill(url: str, rows: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn)
        conn.execute(
            "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts,"
            " completed_at, created_at, updated_at)"
            " SELECT 'k-' || i, (ARRAY['q_collectability','q_escalation','q_outbox_processor'])[1 + i %% 3],"
            " i, 'completed', 1, t, t, t FROM generate_series(1, %s) AS i,"
            " LATERAL (SELECT now() - (i::float8 / %s) * interval '7 days' AS t) AS d",
            (rows, rows),
        )
        conn.execute(
            "INSERT INTO workers.queue_samples (queue_name, sampled_at, depth, in_flight, oldest_age_s)"
            " SELECT q, date_trunc('minute', now()) - m * interval '1 minute', (m %% 500), m %% 7, m %% 90"
            " FROM unnest(%s::text[]) AS q, generate_series(0, 7 * 1440 - 1) AS m",
            (list(QUEUES),),
        )
        conn.execute(
            "INSERT INTO workers.dead_letters"
            " (queue_name, msg_id, job_key, message, error, error_type, dead_at)"
            " SELECT 'q_outbox_processor', i, 'dl-' || i, '{}'::jsonb, 'boom', 'RuntimeError',"
            " now() - (i::float8 / 3000) * interval '7 days' FROM generate_series(1, 3000) AS i"
        )
        conn.execute(
            "INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname, pid,"
            " version, started_at, last_heartbeat_at, stopped_at)"
            " SELECT 'w-' || i, q, q, CASE WHEN i % 9 = 0 THEN 'CRASHED' ELSE 'STOPPED' END, 'h', i, 'v',"
            " now() - i * interval '20 minutes', now() - i * interval '20 minutes' + interval '15 minutes',"
            " now() - i * interval '20 minutes' + interval '15 minutes'"
            " FROM generate_series(1, 500) AS i, LATERAL (SELECT (ARRAY['q_collectability','q_escalation',"
            "'q_outbox_processor'])[1 + i % 3] AS q) AS x"
        )
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.report_bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg")
        url = server.start()
        try:
            print(f"filled {args.rows:,} ledger rows and a week of samples in {fill(url, args.rows):.1f} s")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_"))}
            env.update({"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": url})
            times = []
            for run in range(args.runs):
                out = Path(tmp) / f"report-{run}.html"
                started = time.perf_counter()
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "tools.worker_inspector",
                        "report",
                        "--html",
                        str(out),
                        "--since",
                        "7d",
                    ],
                    cwd=PROJECT_ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                times.append(time.perf_counter() - started)
                if done.returncode not in (0, 1):
                    print(done.stderr)
                    return 1
                print(f"run {run + 1}: {times[-1]:.2f} s, {out.stat().st_size:,} bytes")
            median = statistics.median(times)
            print(f"median {median:.2f} s (target < 5 s): {'PASS' if median < 5 else 'MISS'}")
            return 0 if median < 5 else 1
        finally:
            server.stop("immediate")


if __name__ == "__main__":
    sys.exit(main())
