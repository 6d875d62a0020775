"""Retention under load: one prune pass over 1,000,000 expired ledger rows while the no-op
worker runs, and the worker's rate before, during and after it.

    python -m scripts.retention_bench [--expired 1000000] [--jobs 900000]

An embedded server is filled with ``--expired`` completed ledger rows 30 days old and
``--jobs`` bench messages; ``python -m scripts.bench_worker`` starts on them (its own
retention set to 60 days, so it prunes nothing itself). After ``--settle`` seconds of work
this script runs the pass exactly as the housekeeping thread does: ``upkeep.prune`` slices
of 1 s, called again at once until it says done. The worker's rate in each window comes
from the ledger's ``completed_at`` between server clock readings. The verdict: every
expired row gone in one pass, and the rate during it at least half the rate before it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from backend.db import upkeep
from scripts.bench.database import BenchDatabase, start_embedded
from scripts.bench.plan import BENCH_QUEUE
from scripts.bench.workers import worker_env
from scripts.harness.process import WorkerProcess

Conn = psycopg.Connection[Any]


@dataclass(frozen=True, kw_only=True)
class Window:
    name: str
    seconds: float
    jobs: int

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


def server_now(conn: Conn) -> Any:
    row = conn.execute("SELECT clock_timestamp() AS t").fetchone()
    assert row is not None
    return row["t"]


def completed_between(conn: Conn, start: Any, end: Any) -> int:
    row = conn.execute(
        "SELECT count(*) AS n FROM workers.processed_jobs WHERE queue_name = %s"
        " AND completed_at >= %s AND completed_at < %s",
        (BENCH_QUEUE, start, end),
    ).fetchone()
    assert row is not None
    return int(row["n"])


def add_expired(conn: Conn, count: int) -> float:
    started = time.perf_counter()
    conn.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts,"
        " completed_at, created_at, updated_at)"
        " SELECT 'old-' || i, 'q_old', i, 'completed', 1, t, t, t"
        " FROM generate_series(1, %s) i, LATERAL (SELECT now() - interval '30 days' AS t) AS d",
        (count,),
    )
    conn.execute("VACUUM ANALYZE workers.processed_jobs")
    return time.perf_counter() - started


def prune_pass(conn: Conn) -> tuple[int, int, float]:
    """Slices of ``upkeep.prune`` (1 s each) until done: (rows, slices, seconds)."""
    rows = slices = 0
    started = time.perf_counter()
    while True:
        result = upkeep.prune(conn, ledger_days=7, heartbeat_days=7)
        if result is None:
            time.sleep(0.05)
            continue
        rows += result.ledger_rows
        slices += 1
        if result.done:
            return rows, slices, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.retention_bench", description=__doc__)
    parser.add_argument("--expired", type=int, default=1_000_000, help="expired ledger rows")
    parser.add_argument("--jobs", type=int, default=900_000, help="bench messages queued")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds of work before the pass")
    parser.add_argument("--after", type=float, default=6.0, help="seconds measured after the pass")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="retention-bench-") as tmp:
        server, url = start_embedded(Path(tmp) / "pg")
        try:
            return run(url, args)
        finally:
            server.stop("immediate")


def run(url: str, args: argparse.Namespace) -> int:
    db = BenchDatabase(url)
    try:
        return measure(db, args)
    finally:
        db.conn.close()


def measure(db: BenchDatabase, args: argparse.Namespace) -> int:
    url = db.url
    db.prepare()
    print(f"filling: {args.expired:,} expired ledger rows, {args.jobs:,} bench messages", flush=True)
    print(f"  expired rows in {add_expired(db.conn, args.expired):.1f} s", flush=True)
    print(f"  messages in {db.fill_bench(BENCH_QUEUE, args.jobs, 'r'):.1f} s", flush=True)
    worker = WorkerProcess(
        "scripts.bench_worker",
        worker_env(url, WORKER_LEDGER_RETENTION_DAYS="60", WORKER_PRUNE_INTERVAL_S="3600"),
    )
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as pruner:
        try:
            worker.wait_boot()
            time.sleep(1.0)  # past the first batches: the rate before is the steady one
            t0 = server_now(db.conn)
            time.sleep(args.settle)
            t1 = server_now(db.conn)
            rows, slices, pass_s = prune_pass(pruner)
            t2 = server_now(db.conn)
            time.sleep(args.after)
            t3 = server_now(db.conn)
            left = db.conn.execute(
                "SELECT count(*) AS n FROM workers.processed_jobs WHERE queue_name = 'q_old'"
            ).fetchone()
            remaining_jobs = db.conn.execute(f"SELECT count(*) AS n FROM pgmq.q_{BENCH_QUEUE}").fetchone()
        finally:
            worker.stop()
    assert left is not None and remaining_jobs is not None
    windows = [
        Window(name="before", seconds=(t1 - t0).total_seconds(), jobs=completed_between(db.conn, t0, t1)),
        Window(name="during", seconds=(t2 - t1).total_seconds(), jobs=completed_between(db.conn, t1, t2)),
        Window(name="after", seconds=(t3 - t2).total_seconds(), jobs=completed_between(db.conn, t2, t3)),
    ]
    print(f"prune pass: {rows:,} rows in {pass_s:.1f} s, {slices} slices of at most 1 s; {left['n']} left")
    for w in windows:
        print(f"worker {w.name:>6}: {w.jobs:>8,} jobs in {w.seconds:5.1f} s = {w.rate:8,.0f} jobs/s")
    ratio = windows[1].rate / windows[0].rate if windows[0].rate else 0.0
    print(f"during / before: {ratio:.2f} (target >= 0.50)")
    if remaining_jobs["n"] == 0:
        print("warning: the queue ran dry before the end; raise --jobs for a fair 'after' window")
    ok = left["n"] == 0 and rows == args.expired and ratio >= 0.5
    print("PASS" if ok else "MISS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
