"""The last resort of a worker process: an uncaught exception becomes one JSON
``WORKER_CRASH`` line on stdout (the password of ``SUPABASE_DB_URL`` redacted), exit 1.

Only the standard library and ``backend.dburl`` are used for the line, so it is printed
when the failure is a missing dependency; Python exits 1 after the hook. Then, where the
configuration, psycopg and the database allow it, a CRASHED heartbeat row, so that the
inspector shows the failed boots (a crash loop of them); anything missing skips the row.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from backend import __version__


def install() -> None:
    sys.excepthook = _report


def _report(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    name = Path(sys.argv[0]).stem
    data: dict[str, Any] = {
        "worker_name": f"q_{name}",
        "worker_id": f"{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        "version": os.environ.get("WORKER_VERSION") or __version__,
        "git_sha": os.environ.get("RAILWAY_GIT_COMMIT_SHA"),
        "mode": os.environ.get("SUPABASE_MODE"),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "concurrency": 1,
        "from": "BOOTING",
        "to": "CRASHED",
        "trigger": "crash",
        "error": " ".join(str(exc).split()) or kind.__name__,
        "error_type": kind.__name__,
        "traceback": "".join(traceback.format_exception(kind, exc, tb))[-8000:],
        "state_before": "BOOTING",
        "exit_code": 1,
    }
    line = json.dumps(
        {
            "event": "WORKER_CRASH",
            "data": data,
            "level": "ERROR",
            "message": "WORKER_CRASH",
            "timestamp": datetime.now(UTC).isoformat(),
        }
    )
    for secret in _secrets():
        line = line.replace(json.dumps(secret)[1:-1], "***")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    _record(data)


def _record(data: dict[str, Any]) -> None:
    """The failed boot's heartbeat row, best effort: its imports may be what failed."""
    try:
        import psycopg

        from backend.config import load_settings
        from backend.db.upkeep import upsert_heartbeat
        from backend.dburl import libpq_url

        settings = load_settings(lenient=True)
        url = failure_url(settings.db_url, settings.mode)
        if not url:
            return
        keep = ("error", "error_type", "exit_code", "state_before")
        row = {
            **{k: data[k] for k in ("worker_id", "worker_name", "hostname", "pid", "version", "git_sha")},
            "queue_name": data["worker_name"],
            "status": "CRASHED",
            "started_at": datetime.now(UTC),
            "jobs_processed": 0,
            "jobs_failed": 0,
            "rss_bytes": _peak_rss(),
            "metadata": {**settings.railway, **{k: data[k] for k in keep}},
        }
        name = f"{data['worker_id']}:failed-boot"[:63]
        with psycopg.connect(
            libpq_url(url), autocommit=True, connect_timeout=3, application_name=name
        ) as conn:
            upsert_heartbeat(conn, row)
    except Exception:  # the process is ending anyway: the line above is its report
        return


def failure_url(db_url: str | None, mode: str | None) -> str | None:
    """Where a failed boot leaves its row: the configured URL, else (dev, no URL) the
    embedded server's when it runs. Never starts one: the boot has failed already."""
    if db_url or mode not in (None, "dev"):
        return db_url
    try:
        from backend.db.embedded import default_server

        return default_server().url()
    except Exception:  # not installed, or its folder unreadable: no row, the line says it all
        return None


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _secrets() -> list[str]:
    try:
        from backend.dburl import secrets_of

        return secrets_of(os.environ.get("SUPABASE_DB_URL"))
    except Exception:
        return []
