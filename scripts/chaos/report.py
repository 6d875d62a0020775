"""The run's JSON report: the options, what was done, what the checks found, and the
violations that fail the run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from backend.dburl import redact_url
from scripts.chaos.database import Database
from scripts.chaos.options import Options
from scripts.chaos.storm import Timeline
from scripts.chaos.workload import CHAOS_EXTERNAL, CHAOS_WORKER, Plan


def build_report(
    opts: Options,
    db: Database,
    plan: Plan,
    timeline: Timeline,
    effects: Mapping[str, Any],
    processes: Mapping[str, Any],
    recovery: float | None,
    stalls: Mapping[str, Any],
    hung: Mapping[str, Any],
) -> dict[str, Any]:
    kills = Counter(k["signal"] for k in timeline.kills)
    violations = list(effects["violations"]) + list(stalls["violations"]) + list(hung["violations"])
    if processes["problem_count"]:
        violations.append(f"{processes['problem_count']} process problem(s)")
    if not timeline.drained:
        violations.append("the queues did not drain")
    if not kills["SIGTERM"] or not kills["SIGKILL"]:
        violations.append("not both kinds of kill happened")
    restart = dict(timeline.db_restart or {})
    if opts.db_restart:
        if not restart or restart.get("error"):
            violations.append(f"the database restart failed: {restart.get('error', 'not run')}")
        elif recovery is None:
            violations.append("no job completed after the database restart")
        restart["recovery_s"] = recovery
    return {
        "seed": opts.seed,
        "command": opts.replay_command(),
        "passed": not violations,
        "violations": violations,
        "finished_at": datetime.now(UTC).isoformat(),
        "elapsed_s": timeline.elapsed_s,
        "options": {
            "duration_s": opts.duration_s,
            "jobs": opts.jobs,
            "workers_per_kind": opts.per_kind,
            "kill_interval_s": opts.kill_interval_s,
            "job_timeout_s": opts.job_timeout_s,
            "max_attempts": opts.max_attempts,
            "hung_jobs_each": opts.hung_each,
            "db_restart": opts.db_restart,
        },
        "database": {"url": redact_url(db.url), "own_server": db.owned},
        "freezes": {"count": len(timeline.freezes), "log": timeline.freezes},
        "killer_jobs": {"count": len(plan.killers), "worker_exits": processes["job_exits"]},
        "hung_jobs": {**hung, "worker_exits": processes["hung_exits"]},
        "stalls": stalls,
        "kills": {
            "total": len(timeline.kills),
            "SIGTERM": kills["SIGTERM"],
            "SIGKILL": kills["SIGKILL"],
            "skipped": timeline.skipped_kills,
            "inside_external_handler": sum(1 for k in timeline.kills if k["inside_external_handler"]),
            "claims_rescued": timeline.rescued,
            "by_worker": dict(Counter(f"{k['worker']} {k['signal']}" for k in timeline.kills)),
            "log": timeline.kills,
        },
        "processes": processes,
        "jobs": {
            **effects["jobs"],
            "messages_enqueued": plan.messages,
            "copies": plan.copies,
            "poison": len(plan.poison),
            "slow": len(plan.slow),
            "flaky": len(plan.flaky),
            "by_worker": {
                "collectability": len(plan.scores),
                "escalation": len(plan.escalations),
                "outbox_processor": len(plan.deliveries),
                CHAOS_WORKER: len(plan.chaos_jobs),
                CHAOS_EXTERNAL: len(plan.external_jobs),
            },
        },
        "effects": effects["effects"],
        "duplicates": effects["duplicates"],
        "lost": effects["lost"],
        "dead_letters": effects["dead_letters"],
        "stuck_claims": effects["stuck_claims"],
        "drain": {
            **processes["drain"],
            "queues_drained": timeline.drained,
            "wait_after_chaos_s": timeline.drain_wait_s,
        },
        "db_restart": restart or None,
    }
