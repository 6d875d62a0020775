"""What the runtime says of itself: the heartbeat row, and the data of its shutdown and
crash events (the guide's "Log events" and "Crash loops"). Functions of values, so the
runtime only gathers them."""

from __future__ import annotations

import os
import traceback
from datetime import datetime
from typing import Any

from backend.db.migrate import latest_version
from backend.errors import WorkerError, describe
from backend.workers.base import BaseWorker
from backend.workers.deadline import Deadline
from backend.workers.held import Counters
from backend.workers.lifecycle import State
from backend.workers.memory import MemoryVerdict

EXIT_OK, EXIT_FAILURE, EXIT_SIGNAL = 0, 1, 143
# What the row's metadata keeps of a crash: the inspector shows the last error.
_FAILURE_KEPT = ("error", "error_type", "exit_code", "variable", "state_before", "job_keys")


def heartbeat_row(
    worker: BaseWorker,
    *,
    status: State,
    started_at: datetime,
    counters: Counters,
    rss: int,
    peak_rss: int,
    named_sessions: bool,
    deadline: Deadline,
    stop_reason: str,
    memory_limit_bytes: int | None,
    failure: dict[str, Any],
) -> dict[str, Any]:
    """The worker's row of ``workers.heartbeats``."""
    s = worker.settings
    return {
        "worker_id": worker.worker_id,
        "worker_name": worker.queue,
        "queue_name": worker.queue,
        "status": status.value,
        "hostname": s.hostname,
        "pid": os.getpid(),
        "version": s.version,
        "git_sha": s.git_sha,
        "started_at": started_at,
        "jobs_processed": counters.processed,
        "jobs_failed": counters.failed,
        "rss_bytes": rss,
        "metadata": {
            **s.railway,
            "peak_rss_bytes": peak_rss,
            "schema": latest_version(),
            # How the inspector judges this row: the heartbeat's pace, the lease, and
            # whether pg_stat_activity shows this process's own sessions.
            "heartbeat_interval_s": s.heartbeat_interval_s,
            "visibility_timeout_s": s.visibility_timeout_s,
            "pooled": s.uses_transaction_pooler,
            "named_sessions": named_sessions,
            "job_timeout_s": deadline.deadline_s,
            # How an instance ended and what bounded it, for judging a replica's history.
            "stop_reason": stop_reason or None,
            "drain_timeout_s": s.drain_timeout_s,
            "memory_limit_bytes": memory_limit_bytes,
            "job": deadline.in_hand(),
            **failure,
        },
    }


def shutdown_data(
    *, reason: str, drained: bool, uptime_s: float, counters: Counters, exit_code: int
) -> dict[str, Any]:
    """The fields of ``WORKER_SHUTDOWN``."""
    return {
        "reason": reason,
        "drained": drained,
        "uptime_s": uptime_s,
        "jobs_processed": counters.processed,
        "jobs_failed": counters.failed,
        "exit_code": exit_code,
    }


def crash_data(
    exc: BaseException, *, state_before: State, counters: Counters, job_keys: list[str], **extra: Any
) -> dict[str, Any]:
    """The fields of ``WORKER_CRASH`` (and of a failed ``WORKER_BOOT``)."""
    return {
        "error": describe(exc),
        "error_type": type(exc).__name__,
        # An operator's error (configuration, a refused login) is not a bug: no traceback.
        "traceback": "" if isinstance(exc, WorkerError) else "".join(traceback.format_exception(exc))[-8000:],
        "state_before": state_before.value,
        "exit_code": EXIT_FAILURE,
        "jobs_processed": counters.processed,
        "jobs_failed": counters.failed,
        **({"job_keys": job_keys} if job_keys else {}),
        **extra,
    }


def memory_error(memory: MemoryVerdict) -> MemoryError:
    """The crash of the memory soft limit, as the ``MemoryError`` it stands for."""
    figures = memory.figures()
    return MemoryError(f"RSS {figures['rss_mb']} MB above the soft limit of {figures['soft_limit_mb']} MB")


def kept_failure(data: dict[str, Any]) -> dict[str, Any]:
    """What the heartbeat row's metadata keeps of a crash's data."""
    return {k: data[k] for k in _FAILURE_KEPT if data.get(k) is not None}
