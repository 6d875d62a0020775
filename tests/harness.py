"""Run workers as real processes and read their JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from backend.enqueue import build_envelope

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret-Pw-do-not-print"
_DROP = ("SUPABASE_", "WORKER_", "RAILWAY_", "PROBE_", "OUTBOX_")


def with_password(url: str, password: str = PASSWORD) -> str:
    """The same URL with a password (the embedded server trusts local sockets anyway)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.split("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def worker_env(db_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP)}
    env.update(
        {
            "SUPABASE_MODE": "dev",
            "WORKER_HEARTBEAT_INTERVAL_S": "0.2",
            "WORKER_BOOT_TIMEOUT_S": "5",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if db_url:
        env["SUPABASE_DB_URL"] = with_password(db_url)
    env.update(extra)
    return env


class WorkerProcess:
    """One ``python -m <module>`` process; every stdout line must be JSON without secrets."""

    def __init__(self, module: str, env: Mapping[str, str]) -> None:
        self.module = module
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._cond:
                self.lines.append(line)
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self, event: str, predicate: Callable[[dict[str, Any]], bool] = lambda d: True, timeout: float = 20.0
    ) -> dict[str, Any]:
        """The ``data`` of the first ``event`` matching ``predicate``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.get("event") == event and predicate(e.get("data", {})):
                        return dict(e["data"])
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{event} not seen within {timeout}s; output:\n" + "\n".join(self.lines[-40:])
                    )
                self._cond.wait(min(left, 0.1))

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [dict(e["data"]) for e in self.events if e.get("event") == event]

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self._close()
        self.check_output()
        return code

    def check_output(self) -> None:
        """No line may carry the password, a bare traceback, or be anything but JSON."""
        for line in self.lines:
            assert PASSWORD not in line, f"password leaked: {line}"
            assert line.startswith("{"), f"non-JSON output line: {line}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def job(key: str, **payload: Any) -> dict[str, Any]:
    """A probe worker's job envelope (tests/workers/probe.py reads ``payload``)."""
    return build_envelope(
        entity_type="probe", entity_id=key, org_id="org-test", idempotency_key=key, payload=payload
    )


def one(db: Any, sql: str, *args: Any) -> Any:
    """The first column of the first row of ``sql`` (a dict-row connection), or None."""
    row = db.execute(sql, args).fetchone()
    return None if row is None else next(iter(row.values()))


def wait_until(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``check`` (a database query, say) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        time.sleep(interval)
