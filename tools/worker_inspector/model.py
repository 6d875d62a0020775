"""The health report's shape: findings, workers, queues, stuck claims and dead letters,
and how they become JSON (``Report.to_json``, documented in docs/WORKER_INSPECTOR.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from datetime import UTC, datetime
from typing import Any

from backend.config import QUEUES

KILLED_NOTE = "killed without shutting down (OOM kill or SIGKILL)"
DRAIN_KILLED_NOTE = (
    "killed while draining (SIGKILL at the end of the draining window:"
    " RAILWAY_DEPLOYMENT_DRAINING_SECONDS must exceed WORKER_DRAIN_TIMEOUT_S)"
)


def frozen_note(worker_id: str, sessions: int, pid: int | None, idle_tx_s: float | None) -> str:
    """What a frozen worker holds, and the statement that ends it."""
    held = f"; backend {pid} idle in transaction for {duration(idle_tx_s)}" if idle_tx_s else ""
    return (
        f"frozen: the process is not running (SIGSTOP, a stalled container or a network cut) but"
        f" keeps {sessions} database session(s) open{held}; end them:"
        # The session's name is the worker id cut to PostgreSQL's 63 bytes.
        f" SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{worker_id[:63]}'"
    )


@dataclass(frozen=True, kw_only=True)
class Options:
    """Thresholds and display choices of one report."""

    stale_after_s: float = 60.0
    dead_after_s: float = 180.0
    since_s: float = 86400.0
    max_age_s: float = 600.0
    show_all: bool = False
    stuck_limit: int = 20
    statement_timeout_s: float = 10.0
    expected_queues: tuple[str, ...] = QUEUES


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One reason for an unhealthy verdict, or one warning; ``code`` is stable. ``stack``
    (innermost frame last) goes with the findings about a job in hand only."""

    code: str
    subject: str | None
    message: str
    stack: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class JobInHand:
    """The handler call a worker's heartbeat row says it runs: the first job's key, how
    many jobs the call holds (a transactional batch's size), since when and until when."""

    key: str
    msg_id: int | None
    jobs: int
    since: datetime
    age_s: float  # the database's now() minus since
    held_s: float  # how long it had run when the row was last written: what is judged
    deadline_s: float | None
    stack: tuple[str, ...]  # empty until the call has run long

    def label(self) -> str:
        """The key, and ``+N`` for the other jobs of its batch."""
        return self.key + (f" +{self.jobs - 1}" if self.jobs > 1 else "")


@dataclass(frozen=True, kw_only=True)
class Worker:
    """One heartbeat row and its verdict."""

    worker_id: str
    worker_name: str
    queue_name: str
    status: str
    verdict: str
    historic: bool
    heartbeat_age_s: float
    last_heartbeat_at: datetime
    started_at: datetime
    stopped_at: datetime | None
    jobs_processed: int
    jobs_failed: int
    rss_mb: float | None
    version: str
    git_sha: str | None
    replica_id: str | None
    hostname: str
    pid: int
    note: str | None
    error_type: str | None = None  # of a crash, kept in the row's metadata
    error: str | None = None
    heartbeat_interval_s: float | None = None  # how often the worker rewrites its row
    job_timeout_s: float | None = None  # the worker's deadline for a handler call
    job: JobInHand | None = None


@dataclass(frozen=True, kw_only=True)
class Queue:
    """One pgmq queue: its messages, dead letters and live workers."""

    queue_name: str
    depth: int
    visible: int
    in_flight: int
    delayed: int
    oldest_age_s: float | None
    oldest_enqueued_at: datetime | None
    dead_letters: int
    workers_alive: int


@dataclass(frozen=True, kw_only=True)
class StuckClaim:
    """A ``processing`` ledger row whose lease expired: its worker is gone."""

    job_key: str
    queue_name: str
    msg_id: int
    worker_id: str | None
    attempts: int
    lease_expires_at: datetime | None
    age_s: float | None


@dataclass(frozen=True, kw_only=True)
class DeadLetterGroup:
    """The unreplayed dead letters of one queue."""

    queue_name: str
    count: int
    oldest_dead_at: datetime
    newest_dead_at: datetime
    error_types: dict[str, int]
    newest_key: str | None = None  # null when the envelope was unreadable
    newest_error: str | None = None

    def kinds(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.error_types.items()))


@dataclass(frozen=True, kw_only=True)
class Report:
    """Everything the inspector shows, and the verdict."""

    generated_at: datetime
    database: str
    options: Options
    workers: list[Worker]
    verdict_counts: dict[str, int]
    hidden_workers: int
    queues: list[Queue]
    stuck_total: int
    stuck_items: list[StuckClaim]
    dead_letters: list[DeadLetterGroup]
    reasons: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.reasons

    @property
    def verdict(self) -> str:
        return "healthy" if self.healthy else "unhealthy"

    @property
    def dead_letter_total(self) -> int:
        return sum(g.count for g in self.dead_letters)

    def to_json(self) -> dict[str, Any]:
        """The stable JSON document (see docs/WORKER_INSPECTOR.md)."""
        o = self.options
        return {
            "verdict": self.verdict,
            "reasons": [_finding(f) for f in self.reasons],
            "warnings": [_finding(f) for f in self.warnings],
            "generated_at": _iso(self.generated_at),
            "database": self.database,
            "thresholds": {
                "stale_after_s": o.stale_after_s,
                "dead_after_s": o.dead_after_s,
                "since_s": o.since_s,
                "max_age_s": o.max_age_s,
            },
            "workers": [_plain(w) for w in self.workers],
            "worker_summary": {
                "total": sum(self.verdict_counts.values()),
                "shown": len(self.workers),
                "hidden": self.hidden_workers,
                "by_verdict": self.verdict_counts,
            },
            "queues": [_plain(q) for q in self.queues],
            "stuck_claims": {"count": self.stuck_total, "items": [_plain(s) for s in self.stuck_items]},
            "dead_letters": {
                "count": self.dead_letter_total,
                "queues": [_plain(g) for g in self.dead_letters],
            },
        }


def duration(seconds: float) -> str:
    """A short human duration: 45s, 2m05s, 10m, 3h12m, 24h, 2d04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        big, small, units = s // 60, s % 60, "ms"
    elif s <= 86400:
        big, small, units = s // 3600, s % 3600 // 60, "hm"
    else:
        big, small, units = s // 86400, s % 86400 // 3600, "dh"
    return f"{big}{units[0]}" + (f"{small:02d}{units[1]}" if small else "")


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _finding(f: Finding) -> dict[str, Any]:
    """A finding as JSON: ``stack`` only on the findings that have one."""
    plain = _plain(f)
    if f.stack is None:
        del plain["stack"]
    return plain


def _plain(obj: Any) -> dict[str, Any]:
    """A dataclass as a JSON-ready dict: datetimes as ISO-8601 strings, a dataclass inside
    it as an object."""
    return jsonable(vars(obj))


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its datetimes as UTC ISO-8601 strings."""
    return {k: _value(v) for k, v in row.items()}


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(value)
    return value
