"""The catalogue of every event the runtime and its tools log, with the fields each carries.

``backend.logs.log_event`` takes an ``Event``; ``FIELDS`` lists every field an event may
carry (a field may be absent when the guide says when it is present). The operators' guide
(``docs/RAILWAY_WORKER_CONFIG.md``, "Log events") documents exactly this table: a test
compares the two, and the process tests check every line a worker writes against it.
To add an event: a member here, its fields, its row in the guide.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Event(StrEnum):
    """Every event name a line of this code can carry."""

    # the lifecycle (backend.workers.lifecycle)
    WORKER_BOOT = "WORKER_BOOT"
    WORKER_DRAINING = "WORKER_DRAINING"
    WORKER_SHUTDOWN = "WORKER_SHUTDOWN"
    WORKER_CRASH = "WORKER_CRASH"
    WORKER_MEMORY_SOFT_LIMIT = "WORKER_MEMORY_SOFT_LIMIT"
    # jobs (backend.workers.processor, outcomes, transactional)
    JOB_FAILED = "JOB_FAILED"
    BATCH_RETRIED_ONE_BY_ONE = "BATCH_RETRIED_ONE_BY_ONE"
    JOB_DEAD_LETTERED = "JOB_DEAD_LETTERED"
    JOB_CLAIM_LOST = "JOB_CLAIM_LOST"
    JOB_RESCUED = "JOB_RESCUED"
    JOB_TIMED_OUT = "JOB_TIMED_OUT"
    JOB_COMPLETED = "JOB_COMPLETED"  # DEBUG
    JOB_SKIPPED = "JOB_SKIPPED"  # DEBUG: a copy of a key already completed
    # liveness (consumer, housekeeping, runtime)
    TRANSACTION_TIMED_OUT = "TRANSACTION_TIMED_OUT"
    WORKER_STALLED = "WORKER_STALLED"
    RELEASE_FAILED = "RELEASE_FAILED"
    # the database (backend.db.connect, consumer)
    DB_BOOT_RETRY = "DB_BOOT_RETRY"
    DB_OUTAGE = "DB_OUTAGE"
    DB_RETRY = "DB_RETRY"
    DB_RECOVERED = "DB_RECOVERED"
    # housekeeping
    HEARTBEAT_FAILED = "HEARTBEAT_FAILED"
    LEASE_EXTEND_FAILED = "LEASE_EXTEND_FAILED"
    PRUNE_FAILED = "PRUNE_FAILED"
    SAMPLE_FAILED = "SAMPLE_FAILED"
    HOUSEKEEPING_RECOVERED = "HOUSEKEEPING_RECOVERED"
    RETENTION_PRUNED = "RETENTION_PRUNED"
    WORKER_PROGRESS = "WORKER_PROGRESS"
    # the outbox worker
    OUTBOX_CHANNELS = "OUTBOX_CHANNELS"
    OUTBOX_DELIVERED = "OUTBOX_DELIVERED"
    # python -m backend.db.migrate
    MIGRATION_APPLIED = "MIGRATION_APPLIED"
    MIGRATION_DEFERRED = "MIGRATION_DEFERRED"
    MIGRATION_WAITING = "MIGRATION_WAITING"
    MIGRATIONS_DONE = "MIGRATIONS_DONE"
    MIGRATION_STATUS = "MIGRATION_STATUS"
    MIGRATION_FAILED = "MIGRATION_FAILED"
    # a line from a library, not an event of this code (the formatter's default)
    LOG = "LOG"


IDENTITY = ("worker_name", "worker_id", "version", "git_sha", "mode", "hostname", "pid", "concurrency")
TRANSITION = ("from", "to", "trigger")
_LIFECYCLE = (*IDENTITY, *TRANSITION)
_ERROR = ("error", "error_type")
_CRASH = (*_ERROR, "traceback", "state_before", "exit_code")
_MEMORY = ("rss_mb", "limit_mb", "soft_limit_mb")

FIELDS: Mapping[Event, tuple[str, ...]] = {
    Event.WORKER_BOOT: (
        *_LIFECYCLE,
        "db_status",
        "notifications",
        "railway",
        "boot_s",
        "queue",
        "db_url",
        "previous",
        *_ERROR,
        "variable",
        "traceback",
        "state_before",
        "exit_code",
        "jobs_processed",
        "jobs_failed",
    ),
    Event.WORKER_DRAINING: (*_LIFECYCLE, "reason", "in_flight", "drain_timeout_s"),
    Event.WORKER_SHUTDOWN: (
        *_LIFECYCLE,
        "reason",
        "drained",
        "uptime_s",
        "jobs_processed",
        "jobs_failed",
        "exit_code",
        "abandoned",
        "in_flight",
    ),
    Event.WORKER_CRASH: (
        *_LIFECYCLE,
        *_CRASH,
        "jobs_processed",
        "jobs_failed",
        "db_status",
        "variable",
        "drained",
        *_MEMORY,
        "abandoned",
        "job_keys",
        "stack",
    ),
    Event.WORKER_MEMORY_SOFT_LIMIT: ("worker_id", *_MEMORY),
    Event.JOB_FAILED: (
        "queue",
        "job_key",
        "msg_id",
        "attempt",
        "max_attempts",
        *_ERROR,
        "retry_in_s",
        "retry_after_s",
    ),
    Event.BATCH_RETRIED_ONE_BY_ONE: ("queue", "jobs", *_ERROR),
    Event.JOB_DEAD_LETTERED: ("queue", "job_key", "msg_id", "attempts", *_ERROR),
    Event.TRANSACTION_TIMED_OUT: ("worker_id", "queue", *_ERROR, "limit_s", "consequence", "fix"),
    Event.WORKER_STALLED: ("worker_id", "stalled_s", "consequence"),
    Event.WORKER_PROGRESS: (
        "worker_id",
        "queue",
        "done",
        "failed",
        "seconds",
        "rate_per_s",
        "queue_depth",
        "jobs_processed",
        "jobs_failed",
    ),
    Event.JOB_COMPLETED: ("queue", "job_key", "msg_id", "attempt"),
    Event.JOB_SKIPPED: ("queue", "job_key", "msg_id", "reason"),
    Event.RELEASE_FAILED: ("worker_id", "messages", "claims", *_ERROR, "consequence"),
    Event.JOB_CLAIM_LOST: ("queue", "job_key", "msg_id", "attempt"),
    Event.JOB_TIMED_OUT: (
        "queue",
        "job_key",
        "msg_id",
        "jobs",
        "attempt",
        "seconds",
        "deadline_s",
        "interrupted",
        "stack",
        "outcome",
        "fix",
    ),
    Event.JOB_RESCUED: ("queue", "job_key", "msg_id", "owner", "consequence"),
    Event.DB_BOOT_RETRY: ("attempt", "delay_s", *_ERROR),
    Event.DB_OUTAGE: ("worker_id", *_ERROR),
    Event.DB_RETRY: ("attempt", "delay_s", *_ERROR),
    Event.DB_RECOVERED: ("worker_id", "outage_s"),
    Event.HEARTBEAT_FAILED: ("worker_id", "status", *_ERROR),
    Event.LEASE_EXTEND_FAILED: ("worker_id", *_ERROR),
    Event.PRUNE_FAILED: ("worker_id", *_ERROR),
    Event.SAMPLE_FAILED: ("worker_id", *_ERROR),
    Event.HOUSEKEEPING_RECOVERED: ("worker_id", "duty"),
    Event.RETENTION_PRUNED: ("ledger_rows", "heartbeat_rows", "dead_letter_rows"),
    Event.OUTBOX_CHANNELS: ("worker_id", "webhook", "slack", "discord", "email", "fix"),
    Event.OUTBOX_DELIVERED: (
        "job_key",
        "msg_id",
        "channel",
        "destination",
        "status",
        "message_id",
        "attempt",
    ),
    Event.MIGRATION_APPLIED: ("version", "name"),
    Event.MIGRATION_DEFERRED: ("version", "name", "older_workers", "fix"),
    Event.MIGRATION_WAITING: (
        "waited_s",
        "timeout_s",
        "holder_pid",
        "holder_application_name",
        "holder_state",
        "holder_backend_start",
        "holder_state_change",
        "fix",
    ),
    Event.MIGRATIONS_DONE: ("applied", "version", "queues"),
    Event.MIGRATION_STATUS: ("current", "latest", "pending"),
    Event.MIGRATION_FAILED: _ERROR,
    Event.LOG: (),
}


def undeclared(event: object, fields: object) -> list[str]:
    """The fields a logged line of a catalogue event carries beyond what the catalogue
    declares for it (empty when the line is what the catalogue says). An event a worker
    defines for itself (``log_worker_event``) is not the catalogue's to check."""
    if not isinstance(event, str) or event not in Event.__members__:
        return []
    names = fields if isinstance(fields, dict) else {}
    declared = FIELDS[Event(event)]
    return [f"{event}: undeclared field {name!r}" for name in names if name not in declared]
