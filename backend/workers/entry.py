"""The ``python -m backend.workers.<name>`` entry point: configure logging, run, exit."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from backend.config import load_settings
from backend.dburl import secrets_of
from backend.errors import ConfigError
from backend.events import Event
from backend.logs import configure_logging, log_event
from backend.workers.base import BaseWorker
from backend.workers.lifecycle import Lifecycle, State
from backend.workers.runtime import EXIT_FAILURE, Runtime
from backend.workers.signals import SignalWatcher


def run_worker(worker_cls: type[BaseWorker]) -> None:
    """The ``python -m backend.workers.<name>`` entry point: configure, run, exit."""
    try:
        settings = load_settings(defaults=worker_cls.defaults)
    except ConfigError as exc:
        configure_logging("INFO", secrets=secrets_of(os.environ.get("SUPABASE_DB_URL")))
        BareIdentity(worker_cls).fail(exc)
        sys.exit(EXIT_FAILURE)
    configure_logging(settings.log_level, secrets=secrets_of(settings.db_url))
    runtime = Runtime(worker_cls(settings))
    SignalWatcher(runtime.on_signal).install()
    code = runtime.run()
    logging.shutdown()
    sys.exit(code)


class BareIdentity:
    """Reports a configuration error before any settings exist (WORKER_BOOT, WORKER_CRASH)."""

    def __init__(self, worker_cls: type[BaseWorker]) -> None:
        self.queue = f"q_{worker_cls.name}"

    def fail(self, exc: ConfigError) -> None:
        identity = {
            "worker_name": self.queue,
            "worker_id": None,
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


def _package_version() -> str:
    from backend import __version__

    return __version__
