"""The tunables: every ``WORKER_*`` setting with its default, parser, minimum and help, in
one table (``TUNABLES``) that drives parsing (``backend.config.load_settings``), the
diagnostic commands' help and the guide's variable table, which a test keeps in step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_DRAIN_TIMEOUT_S = 25.0


@dataclass(frozen=True, kw_only=True)
class Tunable:
    """One numeric or text setting: its variable, default and parser."""

    variable: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    minimum: float | None = None


TUNABLES: tuple[Tunable, ...] = (
    Tunable(
        variable="WORKER_HEARTBEAT_INTERVAL_S",
        default=30.0,
        parse=float,
        minimum=0.01,
        help="seconds between heartbeat upserts",
    ),
    Tunable(
        variable="WORKER_VISIBILITY_TIMEOUT_S",
        default=30,
        parse=int,
        minimum=1,
        help="message lease in seconds; leases of running jobs are extended",
    ),
    Tunable(
        variable="WORKER_BATCH_SIZE", default=100, parse=int, minimum=1, help="messages read per round trip"
    ),
    Tunable(
        variable="WORKER_MAX_ATTEMPTS",
        default=5,
        parse=int,
        minimum=1,
        help="attempts before a job is dead-lettered",
    ),
    Tunable(
        variable="WORKER_RETRY_BASE_S",
        default=1.0,
        parse=float,
        minimum=0,
        help="first retry delay; doubles per attempt, with jitter",
    ),
    Tunable(
        variable="WORKER_RETRY_MAX_S", default=300.0, parse=float, minimum=0, help="cap of the retry delay"
    ),
    Tunable(
        variable="WORKER_JOB_TIMEOUT_S",
        default=60.0,
        parse=float,
        minimum=0.1,
        help="deadline of one handler call (a job, or a transactional batch); past it the handler"
        " is interrupted, or the worker exits 1 if it cannot be; the attempt counts",
    ),
    Tunable(
        variable="WORKER_DRAIN_TIMEOUT_S",
        default=DEFAULT_DRAIN_TIMEOUT_S,
        parse=float,
        minimum=0,
        help="how long SIGTERM waits for in-flight work",
    ),
    Tunable(
        variable="WORKER_BOOT_TIMEOUT_S",
        default=30.0,
        parse=float,
        minimum=0,
        help="how long boot retries the database before giving up",
    ),
    Tunable(
        variable="WORKER_MIGRATION_LOCK_TIMEOUT_S",
        default=60.0,
        parse=float,
        minimum=0,
        help="how long python -m backend.db.migrate waits for the migrations' lock that another"
        " session holds (a dev worker's boot: at most WORKER_BOOT_TIMEOUT_S)",
    ),
    Tunable(
        variable="WORKER_POLL_INTERVAL_S",
        default=0.1,
        parse=float,
        minimum=0.001,
        help="polling interval when insert notifications are unavailable",
    ),
    Tunable(
        variable="WORKER_NOTIFY_WAIT_S",
        default=1.0,
        parse=float,
        minimum=0.01,
        help="with notifications, the longest idle wait before the queue is read again",
    ),
    Tunable(
        variable="WORKER_NOTIFICATIONS",
        default="auto",
        parse=str,
        help="auto (LISTEN when the server and connection allow it) or off (poll)",
    ),
    Tunable(
        variable="WORKER_MEMORY_LIMIT_MB",
        default=None,
        parse=float,
        minimum=1e-6,
        help="memory limit; default the cgroup's memory.max (none when unlimited)",
    ),
    Tunable(
        variable="WORKER_MEMORY_SOFT_LIMIT_PCT",
        default=90.0,
        parse=float,
        minimum=1,
        help="percentage of the limit above which the worker drains and exits 1",
    ),
    Tunable(
        variable="WORKER_MEMORY_CHECK_INTERVAL_S",
        default=1.0,
        parse=float,
        minimum=0.01,
        help="seconds between RSS samples",
    ),
    Tunable(
        variable="WORKER_SAMPLE_INTERVAL_S",
        default=60.0,
        parse=float,
        minimum=0.5,
        help="seconds per queue sample (depth, in flight, oldest age) in workers.queue_samples",
    ),
    Tunable(
        variable="WORKER_PROGRESS_INTERVAL_S",
        default=10.0,
        parse=float,
        minimum=0.1,
        help="seconds between WORKER_PROGRESS lines while jobs flow (none while idle)",
    ),
    Tunable(
        variable="WORKER_MAX_PAYLOAD_BYTES",
        default=262144,
        parse=int,
        minimum=1,
        help="largest accepted message body; larger ones are dead-lettered",
    ),
    Tunable(
        variable="WORKER_LEDGER_RETENTION_DAYS",
        default=7.0,
        parse=float,
        minimum=0,
        help="age after which completed ledger rows are pruned",
    ),
    Tunable(
        variable="WORKER_HEARTBEAT_RETENTION_DAYS",
        default=7.0,
        parse=float,
        minimum=0,
        help="age after which stopped or crashed heartbeat rows are pruned",
    ),
    Tunable(
        variable="WORKER_PRUNE_INTERVAL_S",
        default=600.0,
        parse=float,
        minimum=0.01,
        help="seconds between retention passes",
    ),
    Tunable(variable="WORKER_LOG_LEVEL", default="INFO", parse=str, help="DEBUG, INFO, WARNING or ERROR"),
    Tunable(
        variable="WORKER_LOG_FORMAT",
        default="auto",
        parse=str,
        help="json, console (one short text line per event), or auto: console at a terminal,"
        " json otherwise and on Railway",
    ),
)
DEFAULTS: Mapping[str, Any] = {t.variable: t.default for t in TUNABLES}
