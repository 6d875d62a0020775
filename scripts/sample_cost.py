"""What the queue samples cost an idle worker, counted by the server: one no-op worker,
idle, sampling every ``--interval`` seconds for ``--seconds``; pg_stat_statements counts
every statement of its role (as ``python -m scripts.bench`` does), by kind.

    python -m scripts.sample_cost [--interval 2] [--seconds 30]

At the default interval (WORKER_SAMPLE_INTERVAL_S=60) the sampling is one statement a minute
when the count here is one per interval.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.database import BenchDatabase, start_embedded, statement_delta
from scripts.bench.plan import BENCH_QUEUE
from scripts.bench.workers import worker_env
from scripts.harness.process import WorkerProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.sample_cost", description=__doc__)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sample-cost-") as tmp:
        server, url = start_embedded(Path(tmp) / "pg")
        db = BenchDatabase(url)
        try:
            db.prepare()
            if not db.counted_url:
                print(f"cannot count statements: {db.counted_note}")
                return 1
            worker = WorkerProcess(
                "scripts.bench_worker",
                worker_env(db.counted_url, WORKER_SAMPLE_INTERVAL_S=str(args.interval)),
            )
            try:
                worker.wait_boot()
                time.sleep(6.0)  # past boot and the first retention pass
                before = db.statements()
                time.sleep(args.seconds)
                delta = statement_delta(before, db.statements())
            finally:
                worker.stop()
            samples = sum(c for q, (c, _) in delta.items() if "queue_samples" in q and "INSERT" in q)
            beats = sum(c for q, (c, _) in delta.items() if "workers.heartbeats" in q)
            total = sum(c for c, _ in delta.values())
            rows = db.conn.execute(
                "SELECT count(*) AS n FROM workers.queue_samples WHERE queue_name = %s", (BENCH_QUEUE,)
            ).fetchone()
            print(f"idle worker, {args.seconds:g} s, a sample every {args.interval:g} s:")
            print(f"  sample statements {samples} (one per interval: {args.seconds / args.interval:.1f})")
            print(f"  every statement   {total} ({beats} heartbeat), {total / args.seconds:.2f}/s")
            print(f"  sample rows       {rows['n'] if rows else 0}")
            per_interval = samples / (args.seconds / args.interval)
            print(f"  => {per_interval:.2f} sample statements per interval")
            return 0 if per_interval <= 1.2 else 1
        finally:
            db.conn.close()
            server.stop("immediate")


if __name__ == "__main__":
    sys.exit(main())
