"""The health report: what the queries say, judged against the thresholds.

``build_report`` reads every section in one read-only, repeatable-read transaction, so the
sections agree with each other and every age is measured against the same ``now()``.
``Report.to_json`` is the documented machine shape (docs/WORKER_INSPECTOR.md).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from psycopg import IsolationLevel

from backend.db.install import rls_hidden
from backend.db.migrate import applied_versions, migrations, older_live_workers
from tools.worker_inspector import queries
from tools.worker_inspector.jobs import job_findings, job_in_hand, seconds
from tools.worker_inspector.model import (
    DRAIN_KILLED_NOTE,
    KILLED_NOTE,
    DeadLetterGroup,
    Finding,
    Options,
    Queue,
    Report,
    StuckClaim,
    Worker,
    duration,
    frozen_note,
)
from tools.worker_inspector.queries import VERDICTS, Conn, Row
from tools.worker_inspector.replicas import replica_findings, replica_instances


def build_report(conn: Conn, options: Options, *, database: str = "") -> Report:
    """Read every section in one read-only snapshot and judge it."""
    o = options
    thresholds = {"stale_s": o.stale_after_s, "dead_s": o.dead_after_s, "since_s": o.since_s}
    saved = conn.read_only, conn.isolation_level
    conn.read_only, conn.isolation_level = True, IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            now = queries.snapshot_start(conn, o.statement_timeout_s)
            worker_rows = queries.worker_rows(conn, include_historic=o.show_all, **thresholds)
            counts = queries.worker_counts(conn, **thresholds)
            names = queries.queue_names(conn)
            queue_rows = queries.queue_stats(conn, names)
            # This login's view of the queues: row-level security may hide their rows.
            unseen = [(n, why) for n in names if (why := rls_hidden(conn, n, ("SELECT",)))]
            stuck_total, stuck_rows = queries.stuck_claims(conn, o.stuck_limit)
            letter_rows = queries.dead_letter_counts(conn)
            contracts = pending_contracts(conn)
            instances = replica_instances(conn, **thresholds)
    finally:
        conn.read_only, conn.isolation_level = saved

    verdict_counts = Counter({v: 0 for v in VERDICTS})
    alive: Counter[str] = Counter()
    hidden_dead = hidden = 0
    for c in counts:
        verdict_counts[c["verdict"]] += c["count"]
        if c["verdict"] == "alive":
            alive[c["queue_name"]] += c["count"]
        if c["historic"]:
            hidden += c["count"]
            hidden_dead += c["count"] if c["verdict"] == "dead" else 0
    letters = [DeadLetterGroup(**r) for r in letter_rows]
    per_queue_letters = {g.queue_name: g.count for g in letters}
    report = Report(
        generated_at=now,
        database=database,
        options=o,
        workers=[_worker(r, now) for r in worker_rows],
        verdict_counts=dict(verdict_counts),
        hidden_workers=0 if o.show_all else hidden,
        queues=[
            Queue(
                **_rounded(r, "oldest_age_s"),
                dead_letters=per_queue_letters.get(r["queue_name"], 0),
                workers_alive=alive[r["queue_name"]],
            )
            for r in queue_rows
        ],
        stuck_total=stuck_total,
        stuck_items=[StuckClaim(**_rounded(r, "age_s")) for r in stuck_rows],
        dead_letters=letters,
    )
    hung, long = job_findings(report.workers)
    loops, patterns = replica_findings(instances)
    report.reasons.extend([*_reasons(report, names), *loops, *hung])
    report.reasons.extend(Finding(code="queue_hidden", subject=name, message=why) for name, why in unseen)
    report.warnings.extend([*_warnings(report, hidden_dead), *patterns, *long])
    report.warnings.extend(contracts)
    return report


def pending_contracts(conn: Conn) -> list[Finding]:
    """Contract migrations not applied yet: waiting for older workers, or due."""
    applied = applied_versions(conn)
    found = []
    for m in migrations():
        if m.after_workers_at is None or m.version in applied:
            continue
        older = older_live_workers(conn, m.after_workers_at)
        why = (
            f"waits for {len(older)} live worker(s) older than schema {m.after_workers_at}"
            if older
            else "is due: no worker older than its schema runs; run python -m backend.db.migrate"
        )
        found.append(
            Finding(
                code="migration_pending",
                subject=str(m.version),
                message=f"migration {m.version} ({m.name}) {why}",
            )
        )
    return found


def _rounded(row: Row, key: str) -> Row:
    value = row[key]
    return {**row, key: None if value is None else round(value, 3)}


def _worker(row: Row, now: datetime) -> Worker:
    # Only a process that never got to write STOPPED or CRASHED leaves a dead heartbeat.
    note = None
    if row["verdict"] == "dead":
        note = DRAIN_KILLED_NOTE if row["status"] == "DRAINING" else KILLED_NOTE
    if row["verdict"] == "frozen":
        note = frozen_note(row["worker_id"], row["sessions"], row["session_pid"], row["idle_tx_s"])
    rss = row["rss_bytes"]
    timeout = seconds(row["job_timeout_s"])
    return Worker(
        worker_id=row["worker_id"],
        worker_name=row["worker_name"],
        queue_name=row["queue_name"],
        status=row["status"],
        verdict=row["verdict"],
        historic=row["historic"],
        heartbeat_age_s=round(row["age_s"], 3),
        last_heartbeat_at=row["last_heartbeat_at"],
        started_at=row["started_at"],
        stopped_at=row["stopped_at"],
        jobs_processed=row["jobs_processed"],
        jobs_failed=row["jobs_failed"],
        rss_mb=None if rss is None else round(rss / 1048576, 1),
        version=row["version"],
        git_sha=row["git_sha"][:7] if row["git_sha"] else None,
        replica_id=row["replica_id"],
        hostname=row["hostname"],
        pid=row["pid"],
        note=note,
        error_type=row["error_type"],
        error=row["error"],
        heartbeat_interval_s=seconds(row["heartbeat_interval_s"]),
        job_timeout_s=timeout,
        job=job_in_hand(row["job"], timeout, now, row["last_heartbeat_at"]),
    )


def _reasons(report: Report, queue_names: list[str]) -> list[Finding]:
    o = report.options
    found: list[Finding] = []
    for w in report.workers:
        # A dead instance whose replica booted cleanly since was restarted: a warning.
        if w.verdict == "dead" and not w.historic and not _booted_cleanly_since(w, report.workers):
            found.append(
                Finding(
                    code="dead_worker",
                    subject=w.worker_id,
                    message=f"worker {w.worker_name} {w.worker_id} is dead: still {w.status} but "
                    f"no heartbeat for {duration(w.heartbeat_age_s)}; {w.note}",
                )
            )
        if w.verdict == "frozen":
            found.append(
                Finding(
                    code="frozen_worker",
                    subject=w.worker_id,
                    message=f"worker {w.worker_name} {w.worker_id} (pid {w.pid} on {w.hostname}) is"
                    f" frozen, heartbeat {duration(w.heartbeat_age_s)} old; {w.note}",
                )
            )
    for name in o.expected_queues:
        if name not in queue_names:
            found.append(
                Finding(
                    code="queue_missing",
                    subject=name,
                    message=f"queue {name} does not exist; run python -m backend.db.migrate",
                )
            )
    for q in report.queues:
        if q.depth and not q.workers_alive:
            found.append(
                Finding(
                    code="queue_unserved",
                    subject=q.queue_name,
                    message=f"queue {q.queue_name} has {q.depth} message(s) but no alive worker",
                )
            )
        if q.oldest_age_s is not None and q.oldest_age_s > o.max_age_s:
            found.append(
                Finding(
                    code="queue_backlog_old",
                    subject=q.queue_name,
                    message=f"queue {q.queue_name}: oldest message is "
                    f"{duration(q.oldest_age_s)} old "
                    f"(over --max-age {duration(o.max_age_s)})",
                )
            )
    if report.stuck_total:
        found.append(
            Finding(
                code="stuck_claims",
                subject=None,
                message=f"{report.stuck_total} stuck claim(s): processing with an expired lease",
            )
        )
    for g in report.dead_letters:
        found.append(
            Finding(
                code="dead_letters",
                subject=g.queue_name,
                message=f"queue {g.queue_name} has {g.count} unreplayed dead letter(s): {g.kinds()};"
                f" the newest: {g.newest_key or 'an unreadable message'}, {g.newest_error}; fix: the"
                f" handler's error (or the message), then python -m tools.worker_inspector dead-letters"
                f" replay --queue {g.queue_name} --all, or discard those that need no replay",
            )
        )
    return found


def _booted_cleanly_since(w: Worker, workers: list[Worker]) -> bool:
    """Whether a later instance on the same replica (Railway's replica id, else the host) got
    past its boot: it is alive, or stopped cleanly."""
    replica = w.replica_id or w.hostname
    return any(
        (v.replica_id or v.hostname) == replica
        and v.queue_name == w.queue_name
        and v.started_at > w.started_at
        and v.verdict in ("alive", "stale", "stopped")
        for v in workers
    )


def _warnings(report: Report, hidden_dead: int) -> list[Finding]:
    found: list[Finding] = []
    crashed: dict[str, list[Worker]] = {}
    for w in report.workers:
        if w.verdict == "stale":
            found.append(
                Finding(
                    code="stale_worker",
                    subject=w.worker_id,
                    message=f"worker {w.worker_name} {w.worker_id}: no heartbeat "
                    f"for {duration(w.heartbeat_age_s)}",
                )
            )
        elif w.verdict == "crashed" and not w.historic:
            crashed.setdefault(w.queue_name, []).append(w)
        elif w.verdict == "dead" and not w.historic and _booted_cleanly_since(w, report.workers):
            found.append(
                Finding(
                    code="replaced_dead_worker",
                    subject=w.worker_id,
                    message=f"worker {w.worker_name} {w.worker_id} was {w.note},"
                    f" {duration(w.heartbeat_age_s)} ago; its replica has booted cleanly since",
                )
            )
    # Crashes are one line per queue: a crash loop would otherwise flood the list.
    for queue, workers in sorted(crashed.items()):
        latest = min(w.heartbeat_age_s for w in workers)
        found.append(
            Finding(
                code="crashed_workers",
                subject=queue,
                message=f"queue {queue}: {len(workers)} worker(s) crashed in the "
                f"last {duration(report.options.since_s)}, the latest "
                f"{duration(latest)} ago",
            )
        )
    if hidden_dead:
        found.append(
            Finding(
                code="old_dead_workers",
                subject=None,
                message=f"{hidden_dead} worker(s) died before the --since "
                "window and are still marked running (--all shows them)",
            )
        )
    return found
