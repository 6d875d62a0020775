"""The job a worker has in hand, read from its heartbeat row, and the findings about one
that runs long (``long_job``, a warning) or past its deadline (``hung_job``, unhealthy).

A worker rewrites its row every heartbeat interval: ``metadata.job`` is null while no
handler runs, else the call's first key, its size, when it started, its deadline and, once
it has run long, the main thread's stack. An alive worker's job is judged by how long it
had run when the row was last written (``held_s``): a call that ended since is not judged on
a row the worker has not rewritten yet. A worker whose heartbeat is late (stale, frozen)
rewrites nothing: its job is judged by its age.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tools.worker_inspector.model import Finding, JobInHand, Worker, duration

# Verdicts of a process that may still hold its job; dead, stopped and crashed workers'
# own verdicts say what happened to theirs.
HOLDING = ("alive", "stale", "frozen")
# The worker's default heartbeat interval, for rows that do not carry theirs.
DEFAULT_INTERVAL_S = 30.0


def job_in_hand(
    job: Any, job_timeout_s: float | None, now: datetime, last_heartbeat_at: datetime
) -> JobInHand | None:
    """A heartbeat row's ``metadata.job``, or None when there is none or it is unreadable
    (a row written by hand); ``job_timeout_s`` is the worker's deadline, for a job without
    its own."""
    if not isinstance(job, dict):
        return None
    since = _timestamp(job.get("since"))
    if since is None or not isinstance(job.get("key"), str):
        return None
    msg_id, jobs, stack = job.get("msg_id"), job.get("jobs"), job.get("stack")
    return JobInHand(
        key=job["key"],
        msg_id=msg_id if isinstance(msg_id, int) and not isinstance(msg_id, bool) else None,
        jobs=jobs if isinstance(jobs, int) and jobs > 0 else 1,
        since=since,
        age_s=round(max(0.0, (now - since).total_seconds()), 3),
        held_s=round(max(0.0, (last_heartbeat_at - since).total_seconds()), 3),
        deadline_s=seconds(job.get("deadline_s")) or job_timeout_s,
        stack=tuple(str(f) for f in stack) if isinstance(stack, list) else (),
    )


def seconds(value: Any) -> float | None:
    """A positive number of seconds from JSON, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(value)


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def job_findings(workers: list[Worker]) -> tuple[list[Finding], list[Finding]]:
    """(reasons, warnings): ``hung_job`` for a job in hand past its deadline by more than
    its worker's heartbeat interval (the time the worker has to interrupt the call or exit,
    and to say so in its row), ``long_job`` for one past half its deadline (or past it by
    less than that interval)."""
    reasons: list[Finding] = []
    warnings: list[Finding] = []
    for w in workers:
        job = w.job
        if job is None or job.deadline_s is None or w.verdict not in HOLDING:
            continue
        judged = job.held_s if w.verdict == "alive" else job.age_s
        grace = (w.heartbeat_interval_s or DEFAULT_INTERVAL_S) if w.verdict == "alive" else 0.0
        msg = "" if job.msg_id is None else f" (msg {job.msg_id})"
        what = f"worker {w.worker_name} {w.worker_id}: job {job.label()}{msg}"
        what += f" has run for {duration(job.age_s)}"
        if judged > job.deadline_s + grace:
            hung = _hung(what, job)
            reasons.append(Finding(code="hung_job", subject=w.worker_id, message=hung, stack=job.stack))
        elif judged > job.deadline_s / 2:
            where = f"waiting in {job.stack[-1]}" if job.stack else "its stack is not recorded yet"
            past = "past its" if job.age_s > job.deadline_s else "over half its"
            message = f"{what}, {past} {duration(job.deadline_s)} deadline; {where}"
            warnings.append(Finding(code="long_job", subject=w.worker_id, message=message, stack=job.stack))
    return reasons, warnings


def _hung(what: str, job: JobInHand) -> str:
    assert job.deadline_s is not None
    where = f"at {job.stack[-1]}" if job.stack else "where its stack was not recorded"
    return (
        f"{what}, past its {duration(job.deadline_s)} deadline, {where}. The worker should have"
        " interrupted it or exited: it is stuck where Python cannot interrupt it (a socket, lock"
        " or library call without a timeout) or the process is frozen. Fix: give the handler's"
        " blocking calls timeouts shorter than WORKER_JOB_TIMEOUT_S (or raise it); a worker past"
        " its deadline exits and is restarted, and after WORKER_MAX_ATTEMPTS the job is"
        " dead-lettered JobTimedOut. This one has not exited: restart its service"
    )
