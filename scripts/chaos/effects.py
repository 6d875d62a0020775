"""The effects check: every job's effect exactly once, nothing lost, dead letters only for
the poison, no claim left stuck, the receiver's keys accepted once."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.chaos.audit import Conn, Effects, counted_effects
from scripts.chaos.receiver import Call
from scripts.chaos.workload import Plan, notify_key

EXAMPLES = 20
LATE_TOLERANCE_S = 0.05


class _Tally:
    """Keys found duplicated or lost, each with its reasons."""

    def __init__(self) -> None:
        self.keys: dict[str, list[str]] = defaultdict(list)

    def add(self, key: str, why: str) -> None:
        self.keys[key].append(why)

    def summary(self) -> dict[str, Any]:
        return {
            "count": len(self.keys),
            "examples": [{"key": k, "why": w} for k, w in sorted(self.keys.items())[:EXAMPLES]],
        }


def _once(effects: Effects, kind: str, key: str, what: str, dup: _Tally, lost: _Tally) -> None:
    n = effects.get((kind, key), (0, 0.0))[0]
    if n == 0:
        lost.add(key, f"no {what}")
    elif n > 1:
        dup.add(key, f"{what} {n} times")


def _check_chaos_worker(conn: Conn, plan: Plan, dup: _Tally, lost: _Tally) -> Counter[str]:
    """Each chaos worker job's effect once; no killer job's effect ever committed."""
    runs = Counter(
        {
            r["job_key"]: int(r["n"])
            for r in conn.execute("SELECT job_key, count(*) AS n FROM chaos.worker_effects GROUP BY job_key")
        }
    )
    for key in plan.chaos_jobs:
        if runs[key] == 0:
            lost.add(key, "no chaos worker effect")
        elif runs[key] > 1:
            dup.add(key, f"chaos worker effect {runs[key]} times")
    for key in plan.killers:
        if runs[key]:
            dup.add(key, f"a killer job's effect committed {runs[key]} times")
    return runs


def _check_domain(conn: Conn, plan: Plan, effects: Effects, dup: _Tally, lost: _Tally) -> dict[str, int]:
    scores: dict[int, list[str | None]] = defaultdict(list)
    for row in conn.execute("SELECT judgment_id, job_key FROM dragonfly.collectability_scores"):
        scores[row["judgment_id"]].append(row["job_key"])
    for key, judgment in plan.scores.items():
        rows = scores.get(judgment, [])
        if len(rows) > 1:
            dup.add(key, f"{len(rows)} score rows for judgment {judgment}")
        elif rows and rows[0] != key:
            lost.add(key, f"judgment {judgment} scored under key {rows[0]!r}")
        _once(effects, "score", key, "score written", dup, lost)
    events: dict[int, list[str | None]] = defaultdict(list)
    for row in conn.execute(
        "SELECT case_id, job_key FROM dragonfly.enforcement_events WHERE event_type = 'recommendation'"
    ):
        events[row["case_id"]].append(row["job_key"])
    for key, case in plan.escalations.items():
        rows = events.get(case, [])
        if len(rows) > 1:
            dup.add(key, f"{len(rows)} recommendation events for case {case}")
        elif rows and rows[0] != key:
            lost.add(key, f"case {case} recommended under key {rows[0]!r}")
        _once(effects, "recommendation", key, "recommendation event", dup, lost)
        _once(effects, "outbox_message", notify_key(key), "outbox message for the recommendation", dup, lost)
    chaos_runs = _check_chaos_worker(conn, plan, dup, lost)
    return {
        "chaos_worker_effects": sum(chaos_runs[k] for k in plan.chaos_jobs),
        "score_rows": sum(len(v) for v in scores.values()),
        "recommendations": sum(len(v) for v in events.values()),
        "notifications_enqueued": sum(
            n for (kind, k), (n, _) in effects.items() if kind == "outbox_message" and k.endswith(":notify")
        ),
    }


def _check_receiver(
    plan: Plan, calls: Sequence[Call], effects: Effects, dup: _Tally, lost: _Tally
) -> dict[str, Any]:
    accepted = Counter(c.key for c in calls if c.accepted and c.key)
    for key in plan.receiver_keys:
        if not accepted[key]:
            lost.add(key, "never accepted by the receiver")
    for call in calls:
        done = effects.get(("completed", call.key or ""))
        if call.accepted and done and call.at > done[1] + LATE_TOLERANCE_S:
            dup.add(call.key or "", f"delivered again {call.at - done[1]:.2f} s after it was completed")
    called = Counter(c.key for c in calls)
    return {
        "receiver_calls": len(calls),
        "receiver_accepted_keys": len(set(accepted) & plan.receiver_keys),
        "receiver_redelivered_keys": sum(1 for n in called.values() if n > 1),
        "receiver_refused_calls": sum(1 for c in calls if not c.accepted),
        "receiver_callers_gone": sum(1 for c in calls if c.caller_gone),
        "receiver_unexpected_keys": sorted(
            k for k in accepted if k not in plan.receiver_keys and k not in plan.hung
        )[:EXAMPLES],
    }


def check_dead_letters(conn: Conn, plan: Plan) -> dict[str, Any]:
    """Every poison message dead-lettered once, and nothing else."""
    remaining = list(plan.poison)
    unexpected: list[dict[str, Any]] = []
    # Bodies compared as PostgreSQL writes them: some are beyond Python's JSON decoder.
    rows = conn.execute(
        "SELECT queue_name, job_key, message::text AS message, error, error_type"
        " FROM workers.dead_letters ORDER BY id"
    ).fetchall()
    written = {
        id(p): _one(conn.execute("SELECT %s::jsonb::text AS t", (p.text,)).fetchone())["t"]
        for p in plan.poison
        if p.key is None
    }
    for row in rows:
        match = next(
            (
                p
                for p in remaining
                if p.queue == row["queue_name"]
                and (
                    p.key == row["job_key"]
                    if p.key
                    else row["job_key"] is None and row["message"] == written[id(p)]
                )
            ),
            None,
        )
        if match is None:
            unexpected.append(
                {"queue": row["queue_name"], "key": row["job_key"], "error": row["error"][:300]}
            )
        elif match.key in plan.killers and row["error_type"] != "AttemptsExhausted":
            unexpected.append(
                {
                    "queue": row["queue_name"],
                    "key": row["job_key"],
                    "error": f"a killer job dead-lettered as {row['error_type']}",
                }
            )
        else:
            remaining.remove(match)
    ledger = {
        r["job_key"]: r["status"]
        for r in conn.execute(
            "SELECT job_key, status FROM workers.processed_jobs WHERE job_key = ANY(%s)",
            ([p.key for p in plan.poison if p.key],),
        )
    }
    not_dead = sorted(str(p.key) for p in plan.poison if p.key and ledger.get(p.key) != "dead")
    return {
        "total": len(rows),
        "by_type": dict(Counter(str(r["error_type"]) for r in rows)),
        "poison": len(plan.poison),
        "matched": len(plan.poison) - len(remaining),
        "missing": [{"queue": p.queue, "key": p.key} for p in remaining],
        "ledger_not_dead": not_dead,
        "unexpected": unexpected[:EXAMPLES],
        "unexpected_count": len(unexpected),
    }


def _one(row: Mapping[str, Any] | None) -> Mapping[str, Any]:
    assert row is not None
    return row


def check_effects(conn: Conn, plan: Plan, calls: Sequence[Call]) -> dict[str, Any]:
    """Every job of ``plan`` done exactly once; dead letters only for its poison; no stuck claim.

    Reads the ledger, the domain tables, the audit of committed effects (``chaos``) and the
    receiver's ``calls``; returns the report's sections and a list of violations.
    """
    effects = counted_effects(conn)
    dup, lost = _Tally(), _Tally()
    ledger = {
        r["job_key"]: r["status"] for r in conn.execute("SELECT job_key, status FROM workers.processed_jobs")
    }
    for key in plan.expected_keys:
        if ledger.get(key) != "completed":
            lost.add(key, f"ledger status {ledger.get(key) or 'missing'}")
        elif effects.get(("completed", key), (0, 0.0))[0] > 1:
            dup.add(key, f"completed {effects[('completed', key)][0]} times in the ledger")
    counts = _check_domain(conn, plan, effects, dup, lost)
    counts.update(_check_receiver(plan, calls, effects, dup, lost))
    letters = check_dead_letters(conn, plan)
    stuck = [
        r["job_key"]
        for r in conn.execute(
            "SELECT job_key FROM workers.processed_jobs WHERE status = 'processing'"
            " AND lease_expires_at < clock_timestamp() ORDER BY job_key"
        )
    ]
    violations = []
    if dup.keys:
        violations.append(f"{len(dup.keys)} key(s) with an effect more than once")
    if lost.keys:
        violations.append(f"{len(lost.keys)} job(s) lost")
    if letters["unexpected_count"] or letters["missing"] or letters["ledger_not_dead"]:
        violations.append(
            f"dead letters: {letters['matched']} of {letters['poison']} poison messages, "
            f"{letters['unexpected_count']} unexpected"
        )
    if counts["receiver_unexpected_keys"]:
        violations.append("the receiver accepted keys no job has")
    if stuck:
        violations.append(f"{len(stuck)} claim(s) stuck in processing after their lease expired")
    return {
        "jobs": {
            "expected": len(plan.expected_keys),
            "completed": sum(1 for k in plan.expected_keys if ledger.get(k) == "completed"),
        },
        "effects": counts,
        "duplicates": dup.summary(),
        "lost": lost.summary(),
        "dead_letters": letters,
        "stuck_claims": {"count": len(stuck), "examples": stuck[:EXAMPLES]},
        "violations": violations,
    }
