"""A worker as a real process: ``python -m <module>``, its output read line by line.

Every line is kept and the JSON ones are parsed as events (``{"event": ..., "data": ...}``)
as they arrive, so a wait wakes on the line it waits for, bounded by a timeout. A line can
also be copied to a log file. ``bad_lines`` holds the output to the runtime's contract:
every line JSON, no secret in any.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil

from backend.events import undeclared

ROOT = Path(__file__).resolve().parents[2]
BOOT_EVENT = "WORKER_BOOT"
# What a worker reads from its environment (PROBE_: the tests' probe worker). A harness
# starts its workers from none of it, so the caller's shell cannot change a run.
SETTING_PREFIXES = ("SUPABASE_", "WORKER_", "RAILWAY_", "OUTBOX_", "PROBE_")
TAIL_LINES = 40

Data = dict[str, Any]


class WorkerProcessError(RuntimeError):
    """A worker process did not do what was waited for, or printed what it must not."""


def inherited_env(**settings: str) -> dict[str, str]:
    """This process's environment without any worker setting, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env.update(settings)
    return env


def with_password(url: str, password: str, *, user: str | None = None) -> str:
    """``url`` logging in with ``password``, as ``user`` (default: its own, or postgres)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user or parts.username or 'postgres'}:{password}@{host}"))


def _any(data: Data) -> bool:
    return True


class WorkerProcess:
    """One ``python -m <module>`` process and everything it printed (stdout and stderr).

    ``secrets``: text no line may carry; ``strict``: ``wait_exit`` fails when a line is not
    JSON or carries a secret (``check_output``); ``log_path``: a file that gets every line
    as it arrives.
    """

    def __init__(
        self,
        module: str,
        env: Mapping[str, str],
        *,
        secrets: Iterable[str] = (),
        strict: bool = False,
        log_path: Path | None = None,
    ) -> None:
        self.module = module
        self.secrets = tuple(s for s in secrets if s)
        self.strict = strict
        self.lines: list[str] = []
        self.events: list[Data] = []
        self.boot_at: float | None = None  # monotonic time of the first WORKER_BOOT line
        self.boot_cpu = 0.0  # CPU seconds the process had used by then
        log = log_path.open("w", encoding="utf-8") if log_path is not None else None
        self.spawned = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self.ps = psutil.Process(self.proc.pid)
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(log,), name=f"{module} output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, log: Any) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                now = time.monotonic()
                line = raw.rstrip("\n")
                event = _parse(line)
                if event is not None and event.get("event") == BOOT_EVENT and self.boot_at is None:
                    self.boot_at, self.boot_cpu = now, self._cpu_or_zero()
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                with self._cond:
                    self.lines.append(line)
                    if event is not None:
                        self.events.append(event)
                    self._cond.notify_all()
        finally:
            if log is not None:
                log.close()
            with self._cond:
                self._cond.notify_all()

    # what it printed

    def wait_events(
        self,
        event: str,
        count: int = 1,
        *,
        predicate: Callable[[Data], bool] = _any,
        timeout: float = 20.0,
    ) -> list[Data]:
        """The ``data`` of the first ``count`` events called ``event`` that match ``predicate``;
        fails after ``timeout`` seconds, or as soon as the process's output has ended."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    dict(e.get("data") or {})
                    for e in self.events
                    if e.get("event") == event and predicate(e.get("data") or {})
                ]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                ended = not self._reader.is_alive()
                if left <= 0 or ended:
                    when = "before its output ended" if ended else f"within {timeout:g} s"
                    raise WorkerProcessError(
                        f"{self.module}: {event} x{count} not seen {when} (saw {len(found)});"
                        f" last output:\n{self.tail()}"
                    )
                self._cond.wait(min(left, 0.1))

    def wait_for(self, event: str, predicate: Callable[[Data], bool] = _any, timeout: float = 20.0) -> Data:
        """The ``data`` of the first ``event`` matching ``predicate`` (see ``wait_events``)."""
        return self.wait_events(event, predicate=predicate, timeout=timeout)[0]

    def wait_boot(self, timeout: float = 30.0) -> Data:
        """The WORKER_BOOT data of a worker that reached its database; fails otherwise."""
        data = self.wait_for(BOOT_EVENT, timeout=timeout)
        if data.get("db_status") != "ok":
            raise WorkerProcessError(f"{self.module} failed to boot: {data.get('error')}")
        return data

    def named(self, event: str) -> list[Data]:
        """The ``data`` of every event called ``event`` so far."""
        with self._cond:
            return [dict(e.get("data") or {}) for e in self.events if e.get("event") == event]

    def tail(self, count: int = TAIL_LINES) -> str:
        with self._cond:
            return "\n".join(self.lines[-count:])

    def bad_lines(self, lines: Iterable[str] | None = None) -> list[str]:
        """The lines (default: all so far) that are not JSON objects, carry a secret, or
        carry a field the event catalogue (``backend.events``) does not declare."""
        if lines is None:
            with self._cond:
                lines = list(self.lines)
        return [ln for ln in lines if _problem(ln, self.secrets)]

    def check_output(self) -> None:
        """Fail on the first bad line (a leak, a traceback, a field outside the catalogue)."""
        for line in self.bad_lines():
            raise WorkerProcessError(f"{_problem(line, self.secrets)}: {line}")

    # boot, CPU and memory

    @property
    def boot_s(self) -> float:
        """Seconds from the spawn to the WORKER_BOOT line."""
        assert self.boot_at is not None, "the worker has not booted"
        return self.boot_at - self.spawned

    def cpu(self) -> float:
        """CPU seconds (user + system) the process has used."""
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def _cpu_or_zero(self) -> float:
        try:
            return self.cpu()
        except psutil.Error:
            return 0.0

    def rss(self) -> int:
        """Resident memory in bytes."""
        return int(self.ps.memory_info().rss)

    # signals and exit

    def send(self, sig: signal.Signals) -> None:
        """Send ``sig`` (SIGTERM, SIGKILL, SIGSTOP, SIGCONT...) unless the process was reaped."""
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit and its output to end; its exit code."""
        code = self.proc.wait(timeout=timeout)
        self._finish()
        if self.strict:
            self.check_output()
        return code

    def terminate(self, timeout: float = 30.0) -> tuple[float, int]:
        """SIGTERM, then ``wait_exit``: the seconds from the signal to the exit, and the code."""
        started = time.monotonic()
        self.send(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        elapsed = time.monotonic() - started
        return elapsed, self.wait_exit(timeout)

    def stop(self) -> None:
        """SIGKILL the process if it still runs, and wait for it; nothing is checked."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._finish()

    def _finish(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def _parse(line: str) -> Data | None:
    """The line as a JSON object, or None."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, or JSON Python will not read
        return None
    return value if isinstance(value, dict) else None


def _problem(line: str, secrets: Iterable[str]) -> str | None:
    """What is wrong with one output line, or None."""
    if any(s in line for s in secrets):
        return "secret leaked"
    try:
        record = json.loads(line)
    except ValueError:
        return "non-JSON output line"
    if not isinstance(record, dict):
        return "non-JSON output line"
    problems = undeclared(record.get("event"), record.get("data"))
    return "; ".join(problems) if problems else None
