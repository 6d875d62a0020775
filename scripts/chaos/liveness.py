"""The liveness checks: each hung job dead-lettered ``JobTimedOut`` without a committed or
foreign effect, and no job held up longer than its stall limit."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.chaos.audit import Conn, counted_effects
from scripts.chaos.effects import EXAMPLES
from scripts.chaos.receiver import Call
from scripts.chaos.workload import CHAOS_EXTERNAL_QUEUE, CHAOS_QUEUE, HANGS, Plan, notify_key


def check_hung(
    conn: Conn,
    plan: Plan,
    calls: Sequence[Call],
    hangs: Sequence[Mapping[str, Any]],
    timeouts: Sequence[Mapping[str, Any]],
    max_attempts: int,
) -> dict[str, Any]:
    """Each hung job dead-lettered ``JobTimedOut``, its effect never committed (the
    transactional one) or sent with its own key (the external one: the receiver deduplicates).

    ``hangs`` are the chaos workers' ``CHAOS_JOB_HANG`` lines and ``timeouts`` their
    ``JOB_TIMED_OUT`` lines. ``AttemptsExhausted`` is right only when the last attempt hung and
    no record of it dead-lettered the job: its worker was SIGKILL'd or frozen past its lease
    meanwhile (or the database was down), so the next delivery found the attempts used up."""
    hung = list(plan.hung)
    letters = {
        r["job_key"]: r["error_type"]
        for r in conn.execute(
            "SELECT job_key, error_type FROM workers.dead_letters WHERE job_key = ANY(%s)", (hung,)
        )
    }
    ledger = {
        r["job_key"]: r["status"]
        for r in conn.execute(
            "SELECT job_key, status FROM workers.processed_jobs WHERE job_key = ANY(%s)", (hung,)
        )
    }
    committed = Counter(
        r["job_key"]
        for r in conn.execute("SELECT job_key FROM chaos.worker_effects WHERE job_key = ANY(%s)", (hung,))
    )
    sent = Counter(c.key for c in calls if c.accepted and c.key in plan.hung)
    last_hung = {str(h.get("job_key")) for h in hangs if h.get("attempt") == max_attempts}
    recorded = {str(t.get("job_key")) for t in timeouts if str(t.get("outcome")).startswith("dead-lettered")}
    problems: list[str] = []
    for key, queue in sorted(plan.hung.items()):
        kind = letters.get(key)
        unrecorded = key in last_hung and key not in recorded
        if kind != "JobTimedOut" and not (kind == "AttemptsExhausted" and unrecorded):
            problems.append(f"{key}: dead-lettered {kind}" if kind else f"{key}: not dead-lettered")
        if ledger.get(key) != "dead":
            problems.append(f"{key}: ledger status {ledger.get(key) or 'missing'}")
        if queue == CHAOS_QUEUE and committed[key]:
            problems.append(f"{key}: its effect committed {committed[key]} times")
        if queue == CHAOS_EXTERNAL_QUEUE and not sent[key]:
            problems.append(f"{key}: never reached the receiver")
    return {
        "count": len(hung),
        "by_way": {how: sum(1 for k in hung if f"hung-{how}:" in k) for how in HANGS},
        "runs": len(hangs),
        "timed_out": {
            "interrupted": sum(1 for t in timeouts if t.get("interrupted")),
            "not_interrupted": sum(1 for t in timeouts if not t.get("interrupted")),
        },
        "dead_letters": dict(Counter(str(v) for v in letters.values())),
        "receiver_calls": sum(sent.values()),
        "problems": problems[:EXAMPLES],
        "violations": [f"{len(problems)} hung job problem(s)"] if problems else [],
    }


def check_stalls(
    conn: Conn,
    plan: Plan,
    retries: Sequence[Mapping[str, Any]],
    outage: tuple[float | None, float | None],
    limit_s: float,
    started_wall: float = 0.0,
    limits: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """How long each job waited beyond its enqueue: from its enqueue (its wave's commit; for
    a recommendation's notification, the recommendation's commit) to its completion, less
    the retry delays its failed attempts were given (``JOB_FAILED`` lines) and the time
    PostgreSQL was down. Queues are far faster than the producer, so this is the time a job
    was held up: a killed, frozen or cut-off worker's lease, a killer job's batch, a hung
    job's deadline. Each job is held to ``limit_s``, or to its queue's own in ``limits``
    (queue -> seconds: where jobs hang). Hung jobs themselves never complete: not counted."""
    queue_of = {item.key: item.queue for wave in plan.waves for item in wave if item.key}
    queue_of.update({notify_key(k): "q_outbox_processor" for k in plan.escalations})
    limits = limits or {}

    def limit_of(key: str) -> float:
        return limits.get(queue_of.get(key, ""), limit_s)

    enqueued: dict[str, float] = {}
    waves = {
        r["wave"]: r["at"]
        for r in conn.execute("SELECT wave, extract(epoch FROM at)::float8 AS at FROM chaos.waves")
    }
    for index, wave in enumerate(plan.waves):
        for item in wave:
            if item.key and item.key not in enqueued and index in waves:
                enqueued[item.key] = waves[index]
    effects = counted_effects(conn)
    for key in plan.escalations:
        if ("outbox_message", notify_key(key)) in effects:
            enqueued[notify_key(key)] = effects[("outbox_message", notify_key(key))][1]
    delayed: dict[str, float] = defaultdict(float)
    for line in retries:
        delayed[str(line.get("job_key"))] += float(line.get("retry_in_s") or 0)
    down_from, down_to = outage
    stalls: dict[str, float] = {}
    spans: dict[str, tuple[float, float]] = {}
    for key in plan.expected_keys:
        done = effects.get(("completed", key))
        if done is None or key not in enqueued:
            continue
        start, end = enqueued[key], done[1]
        overlap = max(0.0, min(end, down_to or 0.0) - max(start, down_from or 0.0)) if down_from else 0.0
        stalls[key] = max(0.0, end - start - delayed[key] - overlap)
        spans[key] = (start - started_wall, end - started_wall)
    worst = max(stalls, key=lambda k: stalls[k], default=None)
    over = sorted((k for k, v in stalls.items() if v > limit_of(k)), key=lambda k: -stalls[k])

    def longest(hung: bool) -> dict[str, Any] | None:
        """The longest stall of the jobs that share their queue with hung jobs, or of the others."""
        key = max(
            (k for k in stalls if (queue_of.get(k) in limits) == hung), key=stalls.__getitem__, default=None
        )
        return {"key": key, "stall_s": round(stalls[key], 3), "limit_s": limit_of(key)} if key else None

    return {
        "jobs": len(stalls),
        "longest_s": round(stalls[worst], 3) if worst else None,
        "longest_key": worst,
        # when it was enqueued and completed, in seconds from the storm's start (as the
        # kills' and freezes' at_s), to find what held it up
        "longest_span_s": [round(t, 3) for t in spans[worst]] if worst else None,
        "limit_s": limit_of(worst) if worst else limit_s,  # the longest one's
        "base_limit_s": limit_s,
        "limits_s": dict(limits),
        "elsewhere": longest(hung=False),
        "beside_hung": longest(hung=True),
        "over_limit": len(over),
        "examples": [
            {"key": k, "stall_s": round(stalls[k], 3), "limit_s": limit_of(k)} for k in over[:EXAMPLES]
        ],
        "p99_s": round(sorted(stalls.values())[int(0.99 * (len(stalls) - 1))], 3) if stalls else None,
        "violations": [f"{len(over)} job(s) stalled longer than their limit"] if over else [],
    }
