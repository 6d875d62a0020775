"""The last resort of a worker process: an uncaught exception becomes one JSON
``WORKER_CRASH`` line on stdout (the password of ``SUPABASE_DB_URL`` redacted), exit 1.

Only the standard library and ``backend.dburl`` are used, so it works when the failure is
a missing dependency; Python exits 1 after the hook.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
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
    data: dict[str, Any] = {
        "worker_name": f"q_{Path(sys.argv[0]).stem}",
        "worker_id": None,
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


def _secrets() -> list[str]:
    try:
        from backend.dburl import secrets_of

        return secrets_of(os.environ.get("SUPABASE_DB_URL"))
    except Exception:
        return []
