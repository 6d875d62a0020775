"""The chaos run's checks: every effect exactly once, nothing lost, dead letters only for
the poison, no stuck claim, each hung job dead-lettered ``JobTimedOut``, and every replica
ended as its signal (or a job of its own) says it must.

Committed effects are counted by audit triggers (``install_audit``, schema ``chaos``): each
row is written in the transaction of its effect, so a rolled-back effect leaves none and an
effect written twice is seen even when the second write overwrote the first.
"""

from __future__ import annotations

import signal
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

import psycopg

from scripts.chaos_workload import CHAOS_EXTERNAL_QUEUE, CHAOS_QUEUE, HANGS, Call, Plan, notify_key

Conn = psycopg.Connection[Any]
Effects = Mapping[tuple[str, str], tuple[int, float]]  # (kind, job key) -> (count, first at)
HEARTBEAT_S = 0.5
# The inspector's default verdict: stale after 2 heartbeat intervals, dead after 3 x stale.
DEAD_AFTER_S = 6 * HEARTBEAT_S
LATE_TOLERANCE_S = 0.05
EXAMPLES = 20

AUDIT_SQL = """
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.effects (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind     text NOT NULL,
    job_key  text,
    subject  bigint,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS chaos.worker_effects (  -- written by scripts/chaos_worker.py
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_key  text NOT NULL,
    attempt  integer NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS chaos.waves (
    wave  integer PRIMARY KEY,
    at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Each row is written in the transaction of the effect: a rolled-back effect leaves none.
CREATE OR REPLACE FUNCTION chaos.record_effect() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_SCHEMA = 'workers' THEN
        INSERT INTO chaos.effects (kind, job_key) VALUES ('completed', NEW.job_key);
    ELSIF TG_TABLE_NAME = 'collectability_scores' THEN
        INSERT INTO chaos.effects (kind, job_key, subject) VALUES ('score', NEW.job_key, NEW.judgment_id);
    ELSIF TG_TABLE_NAME = 'enforcement_events' THEN
        INSERT INTO chaos.effects (kind, job_key, subject)
        VALUES ('recommendation', NEW.job_key, NEW.case_id);
    ELSE
        INSERT INTO chaos.effects (kind, job_key, subject)
        VALUES ('outbox_message', NEW.message ->> 'idempotency_key', NEW.msg_id);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS chaos_completed_insert ON workers.processed_jobs;
CREATE TRIGGER chaos_completed_insert AFTER INSERT ON workers.processed_jobs FOR EACH ROW
    WHEN (NEW.status = 'completed') EXECUTE FUNCTION chaos.record_effect();
DROP TRIGGER IF EXISTS chaos_completed ON workers.processed_jobs;
-- A completion is a move into 'completed', or a new attempt that completes at once (the
-- claim of a transactional batch writes 'completed' with the next attempt number).
CREATE TRIGGER chaos_completed AFTER UPDATE ON workers.processed_jobs FOR EACH ROW
    WHEN (NEW.status = 'completed'
          AND (OLD.status IS DISTINCT FROM 'completed' OR NEW.attempts > OLD.attempts))
    EXECUTE FUNCTION chaos.record_effect();
DROP TRIGGER IF EXISTS chaos_score ON dragonfly.collectability_scores;
CREATE TRIGGER chaos_score AFTER INSERT OR UPDATE ON dragonfly.collectability_scores
    FOR EACH ROW EXECUTE FUNCTION chaos.record_effect();
DROP TRIGGER IF EXISTS chaos_recommendation ON dragonfly.enforcement_events;
CREATE TRIGGER chaos_recommendation AFTER INSERT ON dragonfly.enforcement_events FOR EACH ROW
    WHEN (NEW.event_type = 'recommendation') EXECUTE FUNCTION chaos.record_effect();
DROP TRIGGER IF EXISTS chaos_outbox_message ON pgmq.q_q_outbox_processor;
CREATE TRIGGER chaos_outbox_message AFTER INSERT ON pgmq.q_q_outbox_processor FOR EACH ROW
    EXECUTE FUNCTION chaos.record_effect();
"""


def install_audit(conn: Conn) -> None:
    """Triggers that record every committed effect and every ledger completion in ``chaos``."""
    conn.execute(AUDIT_SQL)


def remove_audit(conn: Conn) -> None:
    """Drop the ``chaos`` schema; its function goes, and the triggers with it."""
    conn.execute("DROP SCHEMA IF EXISTS chaos CASCADE")


@dataclass(frozen=True, kw_only=True)
class ProcessRecord:
    """One replica's story: what it was sent, how it ended, what it logged."""

    kind: str
    slot: int
    pid: int
    worker_id: str | None
    booted: bool
    signal: str | None
    final: bool
    exit_code: int | None
    drain_s: float | None
    spawned_wall: float
    signalled_wall: float | None
    shutdown_logged: bool
    crash: str | None
    outages: int
    bad_lines: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()  # its last output lines, to read when it has a problem
    job_exit: bool = False  # a chaos worker ended by one of its killer jobs (exit 137)
    timed_out_keys: tuple[str, ...] = ()  # its WORKER_CRASH's job_keys, when JobTimedOut

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.slot} pid {self.pid}"

    @property
    def hung_exit(self) -> bool:
        """Ended (exit 1) by a handler that did not give control back at its deadline."""
        return self.exit_code == 1 and bool(self.timed_out_keys)


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


def _effects(conn: Conn) -> dict[tuple[str, str], tuple[int, float]]:
    rows = conn.execute(
        "SELECT kind, job_key, count(*) AS n, extract(epoch FROM min(at))::float8 AS first"
        " FROM chaos.effects WHERE job_key IS NOT NULL GROUP BY kind, job_key"
    ).fetchall()
    return {(r["kind"], r["job_key"]): (int(r["n"]), float(r["first"])) for r in rows}


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
    effects = _effects(conn)
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
    effects = _effects(conn)
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


def load_heartbeats(conn: Conn) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT worker_id, pid, status, extract(epoch FROM started_at)::float8 AS started,"
        " extract(epoch FROM last_heartbeat_at)::float8 AS beat FROM workers.heartbeats"
    ).fetchall()


def _heartbeat_of(record: ProcessRecord, heartbeats: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for row in heartbeats:
        if record.worker_id and row["worker_id"] == record.worker_id:
            return row
    # Killed before its boot line: the row, if any, is the one of its pid started after its spawn.
    return next(
        (
            row
            for row in heartbeats
            if row["pid"] == record.pid and row["started"] >= record.spawned_wall - 1.0
        ),
        None,
    )


def _process_problems(
    record: ProcessRecord, heartbeats: Sequence[Mapping[str, Any]], now: float, hung: Set[str]
) -> list[str]:
    problems: list[str] = []
    if record.job_exit:
        pass  # one of its jobs ended it (exit 137), whatever it was sent: a drain runs them too
    elif record.hung_exit:
        # A handler blocked in C past its deadline ends its worker, exit 1, whatever it was
        # sent: right for a hung job (its call may be a batch that holds one), wrong for others.
        if not set(record.timed_out_keys) & hung:
            keys = list(record.timed_out_keys)
            problems.append(f"exited 1 at the deadline of jobs that do not hang: {keys}")
    elif record.signal == "SIGTERM":
        if record.exit_code not in (0, 143):
            problems.append(f"exited {record.exit_code} after SIGTERM (expected 0 or 143)")
        if not record.shutdown_logged:
            problems.append("no WORKER_SHUTDOWN line after SIGTERM")
    elif record.signal == "SIGKILL":
        problems += _sigkill_problems(record, heartbeats, now)
    else:
        problems.append(
            f"exited {record.exit_code} without being signalled"
            + (f": {record.crash}" if record.crash else "")
        )
    problems += [f"bad output line: {line}" for line in record.bad_lines]
    return problems


def _sigkill_problems(
    record: ProcessRecord, heartbeats: Sequence[Mapping[str, Any]], now: float
) -> list[str]:
    problems: list[str] = []
    if record.exit_code != -signal.SIGKILL:
        problems.append(f"exited {record.exit_code} though SIGKILL'd")
    row = _heartbeat_of(record, heartbeats)
    if row is not None:
        if row["status"] not in ("BOOTING", "RUNNING", "DRAINING"):
            problems.append(f"heartbeat row says {row['status']} though SIGKILL'd")
        if record.signalled_wall is not None and row["beat"] > record.signalled_wall + 1.0:
            late = row["beat"] - record.signalled_wall
            problems.append(f"heartbeat advanced {late:.1f} s after SIGKILL")
        if now - row["beat"] <= DEAD_AFTER_S:
            problems.append(f"heartbeat only {now - row['beat']:.1f} s old: not recognisable as dead")
    # No row at all (killed before its first write reached the database, during the
    # outage say) claims nothing: there is nothing to mistake for a live worker.
    return problems


def check_processes(
    records: Sequence[ProcessRecord],
    heartbeats: Sequence[Mapping[str, Any]],
    now: float,
    hung: Set[str] = frozenset(),
) -> dict[str, Any]:
    """Exit codes, shutdown lines and heartbeats of every replica, against what it was sent
    (or what its jobs did: a killer job's exit 137; a ``hung`` job's exit 1)."""
    found = {id(r): _process_problems(r, heartbeats, now, hung) for r in records}
    problems = [
        {"process": r.name, "worker_id": r.worker_id, "problem": p, "last_lines": list(r.tail)}
        for r in records
        for p in found[id(r)]
    ]
    exits: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        cause = (
            "killer job"
            if r.job_exit
            else "hung job"
            if r.hung_exit
            else "final SIGTERM"
            if r.final
            else f"after {r.signal}"
            if r.signal
            else "unsignalled"
        )
        exits[cause][str(r.exit_code)] += 1
    drains = [r.drain_s for r in records if r.signal == "SIGTERM" and r.drain_s is not None]
    killed = [r for r in records if r.signal == "SIGKILL"]
    dead = sum(1 for r in killed if not any("heartbeat" in p for p in found[id(r)]))
    rowless = sum(1 for r in killed if _heartbeat_of(r, heartbeats) is None)
    return {
        "started": len(records),
        "exit_codes": {k: dict(v) for k, v in exits.items()},
        "job_exits": sum(1 for r in records if r.job_exit),
        "hung_exits": sum(1 for r in records if r.hung_exit and set(r.timed_out_keys) & hung),
        "sigkilled": len(killed),
        "recognised_dead": dead,
        "sigkilled_without_heartbeat_row": rowless,
        "outage_logs": sum(r.outages for r in records),
        "drain": {
            "count": len(drains),
            "worst_s": max(drains, default=None),
            "median_s": statistics.median(drains) if drains else None,
        },
        "problems": problems[:EXAMPLES],
        "problem_count": len(problems),
    }


def recovery_s(conn: Conn, started_wall: float | None) -> float | None:
    """Seconds from PostgreSQL's start to the first job completed after it."""
    if started_wall is None:
        return None
    row = conn.execute(
        "SELECT extract(epoch FROM min(at))::float8 AS first FROM chaos.effects"
        " WHERE kind = 'completed' AND at > to_timestamp(%s)",
        (started_wall,),
    ).fetchone()
    return round(row["first"] - started_wall, 3) if row and row["first"] else None


# --- the terminal table ---------------------------------------------------------------------


def _span(span: Sequence[float] | None) -> str:
    return f", enqueued at {span[0]:.1f} s, done at {span[1]:.1f} s" if span else ""


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def render(report: Mapping[str, Any]) -> str:
    """The report as a table for the terminal."""
    k, p, j, e = report["kills"], report["processes"], report["jobs"], report["effects"]
    stall = report["stalls"]
    letters, drain, restart = report["dead_letters"], report["drain"], report["db_restart"]
    exits = "; ".join(
        f"{cause}: " + ", ".join(f"{code} x{n}" for code, n in sorted(codes.items()))
        for cause, codes in sorted(p["exit_codes"].items())
    )
    rows: list[tuple[str, str, str]] = [
        ("seed", str(report["seed"]), ""),
        (
            "kills",
            f"{k['total']} (SIGTERM {k['SIGTERM']}, SIGKILL {k['SIGKILL']}, not fired {k['skipped']};"
            f" {k['inside_external_handler']} inside an outbox handler;"
            f" {k.get('claims_rescued', 0)} claims of killed workers given back at once)",
            _mark(k["SIGTERM"] > 0 and k["SIGKILL"] > 0),
        ),
        ("freezes", f"{report['freezes']['count']} (SIGSTOP longer than the visibility timeout)", ""),
        (
            "killer jobs",
            f"{report['killer_jobs']['count']} jobs that end their worker:"
            f" {report['killer_jobs']['worker_exits']} worker exits",
            "",
        ),
        _hung_row(report["hung_jobs"]),
        (
            "longest stall",
            f"{_seconds(stall['longest_s'])} ({stall['longest_key']}{_span(stall.get('longest_span_s'))};"
            f" p99 {_seconds(stall['p99_s'])}, limit {stall['limit_s']:g} s)",
            _mark(not stall["over_limit"]),
        ),
        ("stall limits", _limits(stall), _mark(not stall["over_limit"])),
        (
            "processes",
            f"{p['started']} started, {p['problem_count']} problem(s)",
            _mark(not p["problem_count"]),
        ),
        ("exit codes", exits, ""),
        (
            "SIGKILL'd heartbeats dead",
            f"{p['recognised_dead']} of {p['sigkilled']}"
            f" ({p['sigkilled_without_heartbeat_row']} never wrote one)",
            _mark(p["recognised_dead"] == p["sigkilled"]),
        ),
        (
            "jobs",
            f"{j['completed']} of {j['expected']} completed ({j['messages_enqueued']} messages, "
            f"{j['copies']} copies, {j['slow']} slow, {j['flaky']} refused once)",
            _mark(j["completed"] == j["expected"]),
        ),
        (
            "effects",
            f"{e['score_rows']} scores, {e['recommendations']} recommendations, "
            f"{e['notifications_enqueued']} notifications enqueued",
            "",
        ),
        (
            "receiver",
            f"{e['receiver_accepted_keys']} keys accepted in {e['receiver_calls']} calls"
            f" ({e['receiver_redelivered_keys']} keys called again,"
            f" {e['receiver_refused_calls']} refused, {e['receiver_callers_gone']} callers killed"
            " while waiting)",
            _mark(not e["receiver_unexpected_keys"]),
        ),
        ("duplicates", str(report["duplicates"]["count"]), _mark(not report["duplicates"]["count"])),
        ("lost", str(report["lost"]["count"]), _mark(not report["lost"]["count"])),
        (
            "dead letters",
            f"{letters['total']} ({letters['matched']} of {letters['poison']} poison, "
            f"{letters['unexpected_count']} unexpected: "
            + ", ".join(f"{kind} x{n}" for kind, n in sorted(letters.get("by_type", {}).items()))
            + ")",
            _mark(letters["matched"] == letters["poison"] == letters["total"]),
        ),
        ("stuck claims", str(report["stuck_claims"]["count"]), _mark(not report["stuck_claims"]["count"])),
        (
            "worst drain (SIGTERM to exit)",
            f"{_seconds(drain['worst_s'])} (median {_seconds(drain['median_s'])}, {drain['count']} drains)",
            "",
        ),
        ("queues drained after chaos", f"{drain['wait_after_chaos_s']:g} s", _mark(drain["queues_drained"])),
    ]
    if restart:
        rows.append(
            (
                "database restart",
                f"{restart['mode']} at {restart['at_s']:g} s, down {restart['down_s']:g} s; first job"
                f" completed {_seconds(restart.get('recovery_s'))} after the start",
                _mark(restart.get("recovery_s") is not None and not restart.get("error")),
            )
        )
    rows.append(("result", "PASS" if report["passed"] else "FAIL: " + "; ".join(report["violations"]), ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"  {label:<{width}}  {mark:<4}  {value}" for label, value, mark in rows]
    for section in ("duplicates", "lost"):
        lines += [f"    {section}: {x['key']}: {', '.join(x['why'])}" for x in report[section]["examples"]]
    lines += [f"    process: {x['process']}: {x['problem']}" for x in report["processes"]["problems"]]
    lines += [f"    dead letter: {x['queue']} {x['key']}: {x['error']}" for x in letters["unexpected"]]
    lines += [f"    hung job: {x}" for x in report["hung_jobs"]["problems"]]
    return "\n".join(lines)


def _hung_row(hung: Mapping[str, Any]) -> tuple[str, str, str]:
    ways = ", ".join(f"{n} {how}" for how, n in hung["by_way"].items())
    letters = ", ".join(f"{kind} x{n}" for kind, n in sorted(hung["dead_letters"].items())) or "none"
    timed = hung["timed_out"]
    return (
        "hung jobs",
        f"{hung['count']} handlers that never return ({ways}): {hung['runs']} runs,"
        f" {timed['interrupted']} interrupted, {timed['not_interrupted']} not (each a worker exit:"
        f" {hung['worker_exits']}); dead letters {letters}; {hung['receiver_calls']} receiver calls;"
        f" {timed.get('dragonfly_workers', 0)} deadlines reached on the Dragonfly workers",
        _mark(not hung["problems"]),
    )


def _limits(stall: Mapping[str, Any]) -> str:
    """The limits (the visibility timeout + 10 s, and the deadline besides where jobs hang),
    the longest stall under each, and how many jobs went over."""
    parts = []
    for label, limit, longest in (
        ("", f"{stall['base_limit_s']:g} s", stall.get("elsewhere")),
        (
            " where jobs hang",
            " and ".join(f"{s:g} s on {q}" for q, s in sorted(stall["limits_s"].items())),
            stall.get("beside_hung"),
        ),
    ):
        if longest:
            parts.append(f"{limit}{label} (longest {_seconds(longest['stall_s'])}, {longest['key']})")
    return "; ".join(parts) + f"; {stall['over_limit']} over"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"
