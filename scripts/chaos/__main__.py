"""The command line of the chaos run (``python -m scripts.chaos``): one run, its checks,
the report written and the table printed; exit 0 when every invariant holds, 1 when one does
not, 2 when the run could not be made."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from backend.domain.seed import seed_demo
from scripts.chaos.database import Database, connect
from scripts.chaos.effects import check_effects
from scripts.chaos.liveness import check_hung, check_stalls
from scripts.chaos.options import (
    KINDS,
    RESULTS,
    STALL_ALLOWANCE_S,
    VISIBILITY_S,
    Options,
    SetupError,
    max_attempts,
    parse_args,
    stall_limits,
)
from scripts.chaos.processes import check_processes, load_heartbeats, recovery_s
from scripts.chaos.receiver import Call, ChaosReplies
from scripts.chaos.report import build_report
from scripts.chaos.schedule import build_schedule
from scripts.chaos.storm import ChaosRun
from scripts.chaos.table import render
from scripts.chaos.workload import CHAOS_EXTERNAL, CHAOS_WORKER, ORG_ID, SLOW_MAX_S, build_plan, split_jobs
from scripts.harness.receivers import HttpRecorder


def run(opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make one chaos run and return its report."""
    db = Database.open(opts)
    try:
        db.prepare(opts.reset)
        n_scores, n_escalations, n_notes = split_jobs(opts.jobs)
        with connect(db.url) as conn:
            seeded = seed_demo(conn, judgments=n_scores, cases=n_escalations, org_id=ORG_ID, seed=opts.seed)
        plan = build_plan(
            seed=opts.seed,
            judgment_ids=seeded["judgment_ids"],
            case_ids=seeded["case_ids"],
            notes=n_notes,
            waves=max(2, min(100, int(opts.duration_s / 2))),
            hung_each=opts.hung_each,
            slow_max_s=min(SLOW_MAX_S, opts.job_timeout_s / 2),  # well within the outbox's deadline
        )
        slots = len(KINDS) * opts.per_kind
        schedule = build_schedule(
            seed=opts.seed,
            duration_s=opts.duration_s,
            kill_interval_s=opts.kill_interval_s,
            slots=slots,
            db_restart=opts.db_restart and db.server is not None,
            visibility_s=VISIBILITY_S,
        )
        log(
            f"{len(plan.expected_keys)} jobs ({plan.messages} messages) in {len(plan.waves)} waves; "
            f"{len(schedule.kills)} kills scheduled"
        )
        with HttpRecorder(responder=ChaosReplies()) as receiver:
            chaos = ChaosRun(opts, db, plan, schedule, receiver, log)
            timeline = chaos.execute()
            calls = [Call.of(r) for r in receiver.requests]
        records = [r.record() for r in chaos.supervisor.history]
        retries = [e for r in chaos.supervisor.history for e in r.proc.named("JOB_FAILED")]
        chaos_replicas = [r for r in chaos.supervisor.history if r.kind in (CHAOS_WORKER, CHAOS_EXTERNAL)]
        hangs = [e for r in chaos_replicas for e in r.proc.named("CHAOS_JOB_HANG")]
        timeouts = [e for r in chaos_replicas for e in r.proc.named("JOB_TIMED_OUT")]
        elsewhere = sum(
            len(r.proc.named("JOB_TIMED_OUT")) for r in chaos.supervisor.history if r not in chaos_replicas
        )
        timeline.rescued = sum(len(r.proc.named("JOB_RESCUED")) for r in chaos.supervisor.history)
        restart = timeline.db_restart or {}
        with connect(db.url) as conn:
            effects = check_effects(conn, plan, calls)
            processes = check_processes(records, load_heartbeats(conn), time.time(), hung=set(plan.hung))
            hung = check_hung(conn, plan, calls, hangs, timeouts, max_attempts(opts))
            hung["timed_out"]["dragonfly_workers"] = elsewhere  # no job of theirs hangs
            recovery = recovery_s(conn, restart.get("started_wall"))
            stalls = check_stalls(
                conn,
                plan,
                retries,
                outage=(restart.get("stopped_wall"), restart.get("started_wall")),
                limit_s=VISIBILITY_S + STALL_ALLOWANCE_S,
                started_wall=timeline.started_wall,
                limits=stall_limits(opts),
            )
        return build_report(opts, db, plan, timeline, effects, processes, recovery, stalls, hung)
    finally:
        db.close()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    print(f"chaos seed {opts.seed}; replay with: {opts.replay_command()}", flush=True)
    try:
        report = run(opts, log=lambda line: print(line, flush=True))
    except (SetupError, psycopg.Error, OSError) as exc:
        print(f"chaos: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    path = opts.report or RESULTS / f"chaos-{opts.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(render(report))
    print(f"  report: {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
