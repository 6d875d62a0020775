"""Plain-text rendering: aligned columns, no colours, no terminal needed."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tools.worker_inspector.model import Finding, JobInHand, Report, Worker, duration

Cell = str | int | float | None
KEY_WIDTH = 40  # of a job key in a table
ERROR_WIDTH = 60  # of a worker's last error in the NOTE column


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], numeric: Sequence[str] = ()) -> list[str]:
    """Aligned lines: a header, then one line per row; numeric columns align right."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    right = [h in numeric for h in headers]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    return [line(list(headers)), *(line(r) for r in cells)]


def _cell(value: Cell) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return " ".join(str(value).split())


def timestamp(value: datetime | None) -> str | None:
    """UTC, to the second: 2026-11-28 12:40:00Z."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ago(seconds: float | None) -> str | None:
    return None if seconds is None else duration(seconds)


def render_report(report: Report) -> str:
    """The whole report as text; the verdict comes first so a mailed cron output leads
    with it."""
    o = report.options
    lines = [
        f"worker inspector: {report.verdict.upper()}",
        f"database   {report.database}",
        f"generated  {timestamp(report.generated_at)}",
        f"thresholds stale after {duration(o.stale_after_s)}, dead after "
        f"{duration(o.dead_after_s)}, window {duration(o.since_s)}, "
        f"max message age {duration(o.max_age_s)}",
    ]
    lines += _findings("reasons", report.reasons) + _findings("warnings", report.warnings)
    lines += ["", *_workers(report), "", *_queues(report), "", *_stuck(report), "", *_dead_letters(report)]
    return "\n".join(lines) + "\n"


def _findings(title: str, findings: list[Finding]) -> list[str]:
    if not findings:
        return []
    lines = ["", f"{title}:"]
    for f in findings:
        lines.append(f"  - {f.message}")
        if f.stack:
            lines += ["      stack, innermost last:", *(f"        {frame}" for frame in f.stack)]
    return lines


def job_cells(job: JobInHand | None) -> tuple[str | None, str | None]:
    """The job in hand as (key +N, age): a key is cut to keep the table readable
    (``--json`` has it whole)."""
    if job is None:
        return None, None
    return _cut(job.key, KEY_WIDTH) + job.label()[len(job.key) :], duration(job.age_s)


def _workers(report: Report) -> list[str]:
    title = f"WORKERS  {len(report.workers)} shown"
    if report.hidden_workers:
        title += (
            f", {report.hidden_workers} hidden (stopped, crashed or dead before the "
            f"last {duration(report.options.since_s)}; --all shows them)"
        )
    if not report.workers:
        return [title, "  (none)"]
    rows = [
        [
            w.worker_name,
            w.worker_id,
            w.status,
            w.verdict,
            duration(w.heartbeat_age_s),
            w.jobs_processed,
            w.jobs_failed,
            *job_cells(w.job),
            w.rss_mb,
            w.version,
            w.git_sha,
            w.replica_id,
            _note(w),
        ]
        for w in report.workers
    ]
    headers = [
        "NAME",
        "WORKER ID",
        "STATUS",
        "VERDICT",
        "HEARTBEAT",
        "DONE",
        "FAILED",
        "JOB",
        "JOB AGE",
        "RSS MB",
        "VERSION",
        "SHA",
        "REPLICA",
        "NOTE",
    ]
    return [title, *table(headers, rows, numeric=("HEARTBEAT", "DONE", "FAILED", "JOB AGE", "RSS MB"))]


def _note(w: Worker) -> str | None:
    """The row's note; for a crashed or dead worker, its last error, cut to fit (``--json``
    has ``error_type`` and ``error`` whole); for a job that has run long, where it waits."""
    error = (
        f"{w.error_type}: {_cut(w.error, ERROR_WIDTH)}"
        if w.error and w.verdict in ("crashed", "dead")
        else None
    )
    waits = f"job waits at {w.job.stack[-1]}" if w.job and w.job.stack else None
    return "; ".join(part for part in (w.note, error, waits) if part) or None


def _queues(report: Report) -> list[str]:
    title = f"QUEUES  {len(report.queues)}"
    if not report.queues:
        return [title, "  (none)"]
    rows = [
        [
            q.queue_name,
            q.depth,
            q.visible,
            q.in_flight,
            q.delayed,
            _ago(q.oldest_age_s),
            q.dead_letters,
            q.workers_alive,
        ]
        for q in report.queues
    ]
    headers = ["QUEUE", "DEPTH", "VISIBLE", "IN FLIGHT", "DELAYED", "OLDEST", "DEAD LETTERS", "ALIVE WORKERS"]
    return [title, *table(headers, rows, numeric=headers[1:])]


def _stuck(report: Report) -> list[str]:
    if not report.stuck_total:
        return ["STUCK CLAIMS  none"]
    title = f"STUCK CLAIMS  {report.stuck_total}"
    if len(report.stuck_items) < report.stuck_total:
        title += f" (the {len(report.stuck_items)} oldest shown; --stuck-limit shows more)"
    rows = [
        [s.job_key, s.queue_name, s.msg_id, s.worker_id, s.attempts, _ago(s.age_s) or "no lease"]
        for s in report.stuck_items
    ]
    headers = ["JOB KEY", "QUEUE", "MSG ID", "WORKER ID", "ATTEMPTS", "LEASE EXPIRED"]
    return [title, *table(headers, rows, numeric=("MSG ID", "ATTEMPTS", "LEASE EXPIRED"))]


def _dead_letters(report: Report) -> list[str]:
    if not report.dead_letters:
        return ["DEAD LETTERS  none"]
    rows = [
        [g.queue_name, g.count, timestamp(g.oldest_dead_at), timestamp(g.newest_dead_at), g.kinds()]
        for g in report.dead_letters
    ]
    return [
        f"DEAD LETTERS  {report.dead_letter_total} unreplayed",
        *table(["QUEUE", "COUNT", "OLDEST", "NEWEST", "ERRORS"], rows, numeric=("COUNT",)),
        "  list: python -m tools.worker_inspector dead-letters list [--queue Q]",
        "  replay: python -m tools.worker_inspector dead-letters replay (--id ID | --queue Q --all)",
    ]


def render_dead_letters(total: int, rows: list[dict[str, Any]]) -> str:
    """The dead-letters list as text; the error is cut to keep one line per letter."""
    if not rows:
        return "no dead letters\n"
    title = f"DEAD LETTERS  {len(rows)} of {total} shown, newest first"
    body = [
        [
            r["id"],
            r["queue_name"],
            r["msg_id"],
            r["job_key"],
            r["attempts"],
            r["error_type"],
            timestamp(r["dead_at"]),
            timestamp(r["replayed_at"]),
            _cut(r["error"], 60),
        ]
        for r in rows
    ]
    headers = [
        "ID",
        "QUEUE",
        "MSG ID",
        "JOB KEY",
        "ATTEMPTS",
        "ERROR TYPE",
        "DEAD AT",
        "REPLAYED AT",
        "ERROR",
    ]
    return "\n".join([title, *table(headers, body, numeric=("ID", "MSG ID", "ATTEMPTS"))]) + "\n"


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def emit(args: Any, document: Any, text: str) -> None:
    """The command's answer on stdout: ``document`` as JSON with ``--json``, else ``text``."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write(text)
    sys.stdout.flush()


def one_line(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """The gist of a database error on one line: libpq's 'connection to server at ...
    failed:' preamble and its hints dropped, the password masked."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    text = re.sub(r"^connection (failed|is bad):\s*", "", text)
    text = re.sub(r"^connection to server (at|on) .*? failed:\s*", "", text)
    text = " ".join(text.split()) or type(exc).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
