"""Replica histories: the instances of one queue's worker on one replica, judged together.

Railway starts a new instance seconds after each exit, so a live replacement nearly always
exists and the current instance says nothing of the loop it belongs to. What does is the
replica's history (``RAILWAY_REPLICA_ID``, else the host): how its recent instances ended.

- ``crash_loop`` (unhealthy): ``LOOP_COUNT`` unclean ends (killed, crashed, failed boot)
  within ``LOOP_WINDOW_S``, the last less than ``CLEAN_AFTER_S`` ago: a fresh instance
  does not clear it, running cleanly for ``CLEAN_AFTER_S`` does.
- ``restart_pattern`` (warning): the last ``RESTARTS`` instances stopped cleanly (SIGTERM)
  after uptimes under ``RESTART_UPTIME_S`` within ``RESTART_SPREAD_S`` of their middle one:
  something stops the worker on a schedule.
- ``drain_cut_short`` (warning): an instance killed while ``DRAINING``.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from typing import Any

from backend.config import DEFAULT_DRAIN_TIMEOUT_S
from tools.worker_inspector.jobs import seconds
from tools.worker_inspector.model import Finding, duration
from tools.worker_inspector.queries import _CLASSIFIED, _PROCESSING, Conn, Row

LOOP_WINDOW_S, LOOP_COUNT = 600.0, 3
CLEAN_AFTER_S = 600.0
RESTARTS, RESTART_UPTIME_S, RESTART_SPREAD_S = 3, 120.0, 5.0
UNCLEAN = ("killed", "crashed", "failed boot")

# The verdict's own CTE: an instance is judged killed by the same rules as the table's
# `dead`. Rows that ended within the window, and every row not ended yet within --since.
_INSTANCES = (
    _CLASSIFIED
    + """
SELECT worker_id, queue_name, status, verdict, sessions, pooled, started_at,
       coalesce(metadata ->> 'RAILWAY_REPLICA_ID', hostname) AS replica,
       greatest(0, extract(epoch FROM coalesce(stopped_at, last_heartbeat_at) - started_at))::float8
           AS uptime_s,
       greatest(0, extract(epoch FROM now() - coalesce(stopped_at, last_heartbeat_at)))::float8 AS ended_s,
       metadata -> 'peak_rss_bytes' AS peak_rss_bytes, metadata ->> 'error_type' AS error_type,
       metadata ->> 'error' AS error, metadata ->> 'variable' AS variable,
       metadata ->> 'state_before' AS state_before, metadata -> 'exit_code' AS exit_code,
       metadata -> 'job_keys' AS job_keys, metadata -> 'job' ->> 'key' AS job_key,
       metadata ->> 'stop_reason' AS stop_reason, metadata -> 'drain_timeout_s' AS drain_timeout_s,
       metadata -> 'memory_limit_bytes' AS memory_limit_bytes,
       -- A killed process records no job: the jobs it left to be delivered again do, as a
       -- claim of a later delivery, or a dead letter once its deliveries ran out.
       ARRAY(SELECT p.job_key FROM workers.processed_jobs AS p
             WHERE p.status = """
    + _PROCESSING
    + """ AND p.worker_id = judged.worker_id AND p.attempts > 1
             UNION
             SELECT d.job_key FROM workers.dead_letters AS d
             WHERE d.queue_name = judged.queue_name AND d.worker_id = judged.worker_id
               AND d.error_type = 'AttemptsExhausted' AND d.job_key IS NOT NULL
               AND d.replayed_at IS NULL AND d.discarded_at IS NULL) AS redelivered_keys
FROM judged
WHERE coalesce(stopped_at, last_heartbeat_at) > now() - make_interval(secs => %(window)s)
   OR (status NOT IN ('STOPPED', 'CRASHED') AND NOT historic)
ORDER BY started_at, worker_id
"""
)


def replica_instances(conn: Conn, *, stale_s: float, dead_s: float, since_s: float) -> list[Row]:
    """The heartbeat rows of the replicas' recent history, oldest instance first."""
    params = {"stale": stale_s, "dead": dead_s, "since": since_s, "window": LOOP_WINDOW_S + CLEAN_AFTER_S}
    return conn.execute(_INSTANCES, params).fetchall()


@dataclass(frozen=True, kw_only=True)
class Instance:
    """One worker process of a replica, and how it ended: ``killed``, ``crashed``,
    ``failed boot``, ``stopped``, or None while it runs (or is frozen)."""

    worker_id: str
    status: str
    end: str | None
    started_at: datetime
    uptime_s: float
    ended_s: float  # how long ago its row was last written
    keys: tuple[str, ...]  # the job keys in hand when it ended, as its row records them
    redelivered: tuple[str, ...]  # jobs it claimed on a later delivery, or dead-lettered as such
    peak_rss_bytes: Any
    error_type: str | None
    error: str | None
    variable: str | None
    exit_code: Any
    stop_reason: str | None
    drain_timeout_s: Any
    memory_limit_bytes: Any


def histories(rows: list[Row]) -> dict[tuple[str, str], list[Instance]]:
    """The instances per (queue, replica), oldest first, each with how it ended."""
    grouped: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        grouped[row["queue_name"], row["replica"]].append(row)
    return {key: [_judged(r, newer=i < len(rs) - 1) for i, r in enumerate(rs)] for key, rs in grouped.items()}


def _judged(row: Row, *, newer: bool) -> Instance:
    status, verdict = row["status"], row["verdict"]
    if status == "STOPPED":
        end: str | None = "stopped"
    elif status == "CRASHED":
        end = "failed boot" if row["state_before"] == "BOOTING" else "crashed"
    # Never wrote STOPPED or CRASHED: killed once dead, or once a newer instance of its
    # replica runs while its own heartbeat is late or its sessions are gone.
    elif verdict == "dead" or (newer and (verdict == "stale" or (not row["pooled"] and not row["sessions"]))):
        end = "killed"
    else:
        end = None
    keys = row["job_keys"] if isinstance(row["job_keys"], list) else [row["job_key"]]
    return Instance(
        end=end,
        keys=tuple(str(k) for k in keys if k),
        redelivered=tuple(row["redelivered_keys"] or ()),
        **{name: row[name] for name in _FROM_ROW},
    )


_FROM_ROW = (
    "worker_id",
    "status",
    "started_at",
    "uptime_s",
    "ended_s",
    "peak_rss_bytes",
    "error_type",
    "error",
    "variable",
    "exit_code",
    "stop_reason",
    "drain_timeout_s",
    "memory_limit_bytes",
)


def replica_findings(rows: list[Row]) -> tuple[list[Finding], list[Finding]]:
    """(reasons, warnings) of every replica's history."""
    reasons: list[Finding] = []
    warnings: list[Finding] = []
    for (queue, replica), instances in sorted(histories(rows).items()):
        if loop := _crash_loop(queue, replica, instances):
            reasons.append(loop)
        if pattern := _restart_pattern(queue, replica, instances):
            warnings.append(pattern)
        cut = [i for i in instances if i.end == "killed" and i.status == "DRAINING"]
        warnings += [_cut_short(i, replica) for i in cut]
    return reasons, warnings


def _crash_loop(queue: str, replica: str, instances: list[Instance]) -> Finding | None:
    unclean = sorted((i for i in instances if i.end in UNCLEAN), key=lambda i: -i.ended_s)
    if not unclean or unclean[-1].ended_s > CLEAN_AFTER_S:
        return None
    last = unclean[-1]
    loop = [i for i in unclean if i.ended_s <= last.ended_s + LOOP_WINDOW_S]
    if len(loop) < LOOP_COUNT:
        return None
    kinds = Counter(i.end for i in loop)
    keys = Counter(k for i in loop for k in i.keys)
    held = ", ".join(f"{k} ({n}x)" if n > 1 else k for k, n in keys.most_common(5))
    # Killed instances record nothing: the jobs of the replica delivered again are the suspects.
    again = sorted({k for i in instances for k in i.redelivered} - set(keys))[:5]
    if again and kinds.keys() & {"killed", "crashed"}:
        held += ("; " if held else "") + f"delivered again after an instance ended: {', '.join(again)}"
    return Finding(
        code="crash_loop",
        subject=queue,
        message=f"queue {queue}, replica {replica}: {len(loop)} unclean ends within"
        f" {duration(LOOP_WINDOW_S)} ({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))}),"
        f" the last {duration(last.ended_s)} ago: {_how(last)}"
        + (f"; jobs in hand when they ended: {held}" if held and keys else f"; {held}" if held else "")
        + f"; fix: {_fix(last, bool(held))}"
        + f"; it clears after {duration(CLEAN_AFTER_S)} without an unclean end",
    )


def _how(i: Instance) -> str:
    """How one instance ended, in the operator's terms."""
    error = f"{i.error_type}: {i.error}" if i.error else "no error recorded"
    if i.end == "failed boot":
        return f"failed boot, {error}" + (f" (variable {i.variable})" if i.variable else "")
    if i.end == "crashed":
        return f"crashed, exit {i.exit_code or 1}, {error}"
    peak = seconds(i.peak_rss_bytes)
    limit = seconds(i.memory_limit_bytes)
    rss = f", peak RSS {peak / 1048576:.1f} MB" if peak else ""
    rss += f" of a {limit / 1048576:.0f} MB limit" if peak and limit else ""
    where = " while DRAINING (SIGKILL at the end of the draining window)" if i.status == "DRAINING" else ""
    return f"killed without shutting down (OOM kill or SIGKILL, exit 137){where}{rss}"


def _fix(i: Instance, jobs: bool) -> str:
    if i.end == "failed boot":
        if i.variable:
            return f"set {i.variable} right"
        if i.error_type in ("ImportError", "ModuleNotFoundError"):
            return (
                "install the missing dependency (redeploy with the locked dependencies) or fix the"
                " module the WORKER_CRASH line's traceback names"
            )
        return "fix what the error names, then redeploy"
    job = ", or dead-letter the job in hand or fix its handler" if jobs else ""
    if i.end == "crashed" and i.error_type == "MemoryError":
        return "raise the service's memory (or WORKER_MEMORY_LIMIT_MB), or lower WORKER_BATCH_SIZE" + job
    if i.end == "crashed":
        return "fix the error the WORKER_CRASH line's traceback shows" + job
    if i.status == "DRAINING":
        return "make RAILWAY_DEPLOYMENT_DRAINING_SECONDS exceed WORKER_DRAIN_TIMEOUT_S"
    return "raise the service's memory by 256 MB (or lower WORKER_BATCH_SIZE)" + job


def _restart_pattern(queue: str, replica: str, instances: list[Instance]) -> Finding | None:
    ended = [i for i in instances if i.end is not None]
    last = ended[-RESTARTS:]
    if len(last) < RESTARTS or last[-1].ended_s > CLEAN_AFTER_S:
        return None
    # A clean stop comes from a signal; where the row names it, it must be SIGTERM.
    if any(i.end != "stopped" or "SIGTERM" not in (i.stop_reason or "SIGTERM") for i in last):
        return None
    uptimes = [i.uptime_s for i in last]
    middle = statistics.median(uptimes)
    if max(uptimes) >= RESTART_UPTIME_S or any(abs(u - middle) > RESTART_SPREAD_S for u in uptimes):
        return None
    starts = [i.started_at for i in instances[instances.index(last[0]) :]]
    gaps = [(b - a).total_seconds() for a, b in pairwise(starts)]
    period = statistics.median(gaps[:RESTARTS]) if len(gaps) >= RESTARTS else middle
    return Finding(
        code="restart_pattern",
        subject=queue,
        message=f"queue {queue}, replica {replica}: its last {RESTARTS} instances were stopped by SIGTERM"
        f" after {', '.join(duration(u) for u in uptimes)} of uptime: restarted every ~{duration(period)}."
        " Something stops it on a schedule: a healthcheck left on (the workers serve no HTTP), a"
        " restart policy of the platform, or a cron schedule on the service",
    )


def _cut_short(i: Instance, replica: str) -> Finding:
    recorded = seconds(i.drain_timeout_s)
    timeout = f"{duration(recorded)}" if recorded else f"{duration(DEFAULT_DRAIN_TIMEOUT_S)} unless set"
    return Finding(
        code="drain_cut_short",
        subject=i.worker_id,
        message=f"worker {i.worker_id} (replica {replica}) was killed while DRAINING, {duration(i.ended_s)}"
        f" ago: the service's draining window (RAILWAY_DEPLOYMENT_DRAINING_SECONDS) ended before its drain"
        f" (WORKER_DRAIN_TIMEOUT_S, {timeout}); the window must exceed the drain timeout, with room"
        " for the rollback and the last heartbeat",
    )
