"""The ``python -m backend.workers.<name>`` entry point: configure logging, run, exit."""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

from backend.config import load_settings
from backend.dburl import secrets_of
from backend.errors import ConfigError
from backend.events import Event
from backend.logs import configure_logging, console_wanted, log_event
from backend.workers.base import BaseWorker
from backend.workers.last_resort import failure_url
from backend.workers.lifecycle import Lifecycle, State
from backend.workers.memory import rss_bytes
from backend.workers.runtime import EXIT_FAILURE, Runtime
from backend.workers.signals import SignalWatcher
from backend.workers.status import record_once


def run_worker(worker_cls: type[BaseWorker]) -> None:
    """The ``python -m backend.workers.<name>`` entry point: configure, run, exit."""
    try:
        settings = load_settings(defaults=worker_cls.defaults)
    except ConfigError as exc:
        raw_format = os.environ.get("WORKER_LOG_FORMAT", "auto").strip().lower()
        configure_logging(
            "INFO",
            secrets=secrets_of(os.environ.get("SUPABASE_DB_URL")),
            console=console_wanted(raw_format, os.environ),
        )
        BareIdentity(worker_cls).fail(exc)
        sys.exit(EXIT_FAILURE)
    configure_logging(
        settings.log_level,
        secrets=secrets_of(settings.db_url),
        console=console_wanted(settings.log_format, os.environ),
    )
    runtime = Runtime(worker_cls(settings))
    SignalWatcher(runtime.on_signal).install()
    code = runtime.run()
    logging.shutdown()
    sys.exit(code)


class BareIdentity:
    """Reports a configuration error before any settings exist (WORKER_BOOT, WORKER_CRASH),
    and leaves a CRASHED heartbeat row when the database URL itself is usable, so that a
    configuration crash loop shows in the inspector."""

    def __init__(self, worker_cls: type[BaseWorker]) -> None:
        self.worker_cls = worker_cls
        self.queue = f"q_{worker_cls.name}"
        self.worker_id = f"{worker_cls.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def fail(self, exc: ConfigError) -> None:
        identity = {
            "worker_name": self.queue,
            "worker_id": self.worker_id,
            "version": os.environ.get("WORKER_VERSION") or _package_version(),
            "git_sha": os.environ.get("RAILWAY_GIT_COMMIT_SHA"),
            "mode": os.environ.get("SUPABASE_MODE"),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": 1,
        }

        def emit(event: Event, data: Any, level: int) -> None:
            log_event(event, {**identity, **data}, level)

        Lifecycle(emit=emit, write_status=lambda _s: None).boot_failed(
            db_status="error",
            error=str(exc),
            error_type="ConfigError",
            variable=exc.variable,
            traceback="",
            state_before=State.BOOTING.value,
            exit_code=EXIT_FAILURE,
        )
        self._record(exc)

    def _record(self, exc: ConfigError) -> None:
        try:
            settings = load_settings(lenient=True, defaults=self.worker_cls.defaults)
        except ConfigError:
            return  # the mode or the URL itself is what is wrong
        url = failure_url(settings.db_url, settings.mode)
        if not url:
            return
        failure = {
            "error": str(exc),
            "error_type": "ConfigError",
            "variable": exc.variable,
            "exit_code": 1,
            "state_before": State.BOOTING.value,  # a failed boot, not a crash of a running worker
        }
        row = {
            "worker_id": self.worker_id,
            "worker_name": self.queue,
            "queue_name": self.queue,
            "status": State.CRASHED.value,
            "hostname": settings.hostname,
            "pid": os.getpid(),
            "version": settings.version,
            "git_sha": settings.git_sha,
            "started_at": datetime.now(UTC),
            "jobs_processed": 0,
            "jobs_failed": 0,
            "rss_bytes": rss_bytes(),
            "metadata": {**settings.railway, **failure},
        }
        record_once(url, row)


def _package_version() -> str:
    from backend import __version__

    return __version__
