"""The drills as Railway runs a worker: production settings, and a restarter.

``python -m scripts.drills --defaults`` stages each failure with the workers' defaults (a
30 s heartbeat, a 30 s visibility timeout) under a ``Restarter`` that, like Railway's
restart policy, starts a new instance 2-5 s after each exit. For each drill the inspector
must name the failure (its code, the kind, the cause, the job key where there is one, the
fix) with the expected exit code within ``Pace.within_s`` of the first failure, and keep
naming it for ``Pace.hold_s`` while the restarts go on. ``SHORT`` is the test suite's
pace: a 1 s heartbeat, restarts 0.3-0.6 s apart, the same restarter.
"""

from __future__ import annotations

import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.enqueue import build_envelope, enqueue
from scripts.drills import Drill
from scripts.harness.process import WorkerProcess
from tests.workers.probe import SCHEMA_SQL as PROBE_SCHEMA

PROBE, QUEUE = "tests.workers.probe", "q_probe"


@dataclass(frozen=True, kw_only=True)
class Pace:
    """The settings of a run: the workers' environment and the drill's clocks."""

    env: dict[str, str]
    restart_delay_s: tuple[float, float]  # Railway starts a new instance this long after an exit
    within_s: float  # the verdict must come this long after the first failure
    hold_s: float  # and stay named this long after it came
    term_every_s: float  # the SIGTERM loop's period
    drain_window_s: float  # the draining window before SIGKILL in the drain drill


DEFAULTS = Pace(
    env={},
    restart_delay_s=(2.0, 5.0),
    within_s=90.0,
    hold_s=30.0,
    term_every_s=30.0,
    drain_window_s=2.0,
)
SHORT = Pace(
    env={
        "WORKER_HEARTBEAT_INTERVAL_S": "1",
        "WORKER_VISIBILITY_TIMEOUT_S": "3",
        "WORKER_RETRY_BASE_S": "0.2",
        "WORKER_MAX_ATTEMPTS": "4",
    },
    restart_delay_s=(0.3, 0.6),
    within_s=30.0,
    hold_s=2.0,
    term_every_s=3.0,
    drain_window_s=1.0,
)


class Restarter:
    """Railway's restart policy for one service: a new instance a few seconds after each
    exit, until ``stop``. ``on_start`` is run on a thread of its own for each instance."""

    def __init__(
        self,
        spawn: Callable[[], WorkerProcess],
        delay_s: tuple[float, float],
        on_start: Callable[[WorkerProcess, threading.Event], None] | None = None,
    ) -> None:
        self.spawn, self.delay_s, self.on_start = spawn, delay_s, on_start
        self.instances: list[WorkerProcess] = []
        self.exits: list[int] = []
        self.failed_at: float | None = None  # monotonic time of the first failure
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="restarter", daemon=True)
        self._thread.start()

    def failed(self) -> None:
        """Mark the first failure (the drill's clock starts there)."""
        with self._lock:
            self.failed_at = self.failed_at or time.monotonic()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [
            e.get("data") or {}
            for w in list(self.instances)
            for e in list(w.events)
            if e.get("event") == name
        ]

    def _run(self) -> None:
        while not self.stopping.is_set():
            worker = self.spawn()
            with self._lock:
                self.instances.append(worker)
            if self.on_start is not None:
                threading.Thread(target=self.on_start, args=(worker, self.stopping), daemon=True).start()
            code = worker.proc.wait()
            self.exits.append(code)
            if code != 0:
                self.failed()
            if self.stopping.wait(random.uniform(*self.delay_s)):
                return

    def stop(self) -> None:
        self.stopping.set()
        for worker in list(self.instances):
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGCONT)
            worker.stop()
        self._thread.join(timeout=10)
        for worker in self.instances:  # one started while the others stopped
            worker.stop()


@dataclass(frozen=True, kw_only=True)
class Expect:
    """What the inspector must show: a finding ``code`` whose message has every ``names``
    text (the kind, the cause, the key, the fix), with exit code ``exit``."""

    code: str
    exit: int
    names: tuple[str, ...]
    subject: str | None = QUEUE
    also: tuple[int, ...] = ()  # other exit codes that may stand while it is named


@dataclass
class Result:
    name: str
    passed: bool = False
    after_s: float | None = None  # from the first failure to the verdict
    held_s: float = 0.0
    instances: int = 0
    exit: int | None = None
    message: str = ""
    notes: list[str] = field(default_factory=list)


# --- the drills: each starts its restarter and says what the inspector must show --------


@dataclass
class Stage:
    """One drill's run: its database, pace and replica."""

    drill: Drill
    pace: Pace
    name: str

    def restarter(
        self,
        on_start: Callable[[WorkerProcess, threading.Event], None] | None = None,
        module: str = PROBE,
        **extra: str,
    ) -> Restarter:
        env = {
            **self.pace.env,
            "RAILWAY_REPLICA_ID": f"drill-{self.name}",
            "RAILWAY_SERVICE_NAME": "probe",
            **extra,
        }
        return Restarter(lambda: self.drill.spawn(module, **env), self.pace.restart_delay_s, on_start)

    def jobs(self, key: str, count: int = 1, **payload: Any) -> None:
        with self.drill.conn() as conn:
            conn.execute(PROBE_SCHEMA)
            conn.execute("SELECT pgmq.create(%s)", (QUEUE,))
            for i in range(count):
                envelope = build_envelope(
                    entity_type="probe",
                    entity_id=str(i),
                    org_id="org-drill",
                    idempotency_key=key if count == 1 else f"{key}-{i}",
                    payload=payload,
                )
                enqueue(conn, QUEUE, envelope)


def _kill_in_handler(worker: WorkerProcess, stopping: threading.Event) -> None:
    """The OOM killer: SIGKILL once the job has grown the process."""
    if _waited(worker, "PROBE_IN_HANDLER", stopping):
        worker.send(signal.SIGKILL)


def oom_kill_loop(s: Stage) -> tuple[Restarter, Expect]:
    s.jobs("drill:oom", rss_mb=64, sleep_s=600)
    return s.restarter(_kill_in_handler), Expect(
        code="crash_loop", exit=1, names=("killed", "OOM", "drill:oom", "fix: raise the service's memory")
    )


def sigterm_loop(s: Stage) -> tuple[Restarter, Expect]:
    holder: list[Restarter] = []

    def term_after(worker: WorkerProcess, stopping: threading.Event) -> None:
        if _waited(worker, "WORKER_BOOT", stopping) and not stopping.wait(s.pace.term_every_s):
            holder[0].failed()
            worker.send(signal.SIGTERM)

    holder.append(s.restarter(term_after))
    return holder[0], Expect(
        code="restart_pattern", exit=0, names=("SIGTERM", "restarted every", "healthcheck")
    )


def sys_exit_job(s: Stage) -> tuple[Restarter, Expect]:
    s.jobs("drill:sys-exit", sys_exit=1)
    holder: list[Restarter] = []

    def first_failure(worker: WorkerProcess, stopping: threading.Event) -> None:
        if _waited(worker, "JOB_FAILED", stopping):
            holder[0].failed()

    holder.append(s.restarter(first_failure))
    return holder[0], Expect(code="dead_letters", exit=1, names=("SystemExit", "drill:sys-exit", "fix:"))


def memory_error_job(s: Stage) -> tuple[Restarter, Expect]:
    s.jobs("drill:memory-error", memory_error=True)
    return s.restarter(), Expect(
        code="crash_loop", exit=1, names=("crashed", "MemoryError", "drill:memory-error", "fix:")
    )


def import_error(s: Stage) -> tuple[Restarter, Expect]:
    """A dependency missing from the image: the worker module fails to import."""
    staged = Path(tempfile.mkdtemp(prefix="drill-import-")) / "psycopg_pool"
    staged.mkdir()
    (staged / "__init__.py").write_text('raise ImportError("No module named psycopg_pool (drill)")\n')
    return s.restarter(module="backend.workers.escalation", PYTHONPATH=str(staged.parent)), Expect(
        code="crash_loop",
        exit=1,
        subject="q_escalation",
        names=("failed boot", "ImportError", "psycopg_pool", "fix: install the missing dependency"),
    )


def config_error(s: Stage) -> tuple[Restarter, Expect]:
    return s.restarter(WORKER_BATCH_SIZE="abc"), Expect(
        code="crash_loop",
        exit=1,
        names=("failed boot", "ConfigError", "WORKER_BATCH_SIZE", "fix: set WORKER_BATCH_SIZE"),
    )


def kill_while_draining(s: Stage) -> tuple[Restarter, Expect]:
    """A redeploy with a draining window shorter than the drain: SIGTERM with a job in
    hand, then SIGKILL at the end of the window; the next instance runs the job."""
    s.jobs("drill:drain", sleep_s=20)
    holder: list[Restarter] = []

    def cut(worker: WorkerProcess, stopping: threading.Event) -> None:
        if len(holder[0].instances) > 1 or not _waited(worker, "PROBE_IN_HANDLER", stopping):
            return
        worker.send(signal.SIGTERM)
        if _waited(worker, "WORKER_DRAINING", stopping) and not stopping.wait(s.pace.drain_window_s):
            holder[0].failed()
            worker.send(signal.SIGKILL)

    holder.append(s.restarter(cut))
    return holder[0], Expect(
        code="drain_cut_short",
        exit=0,
        # Until its replacement runs, the killed instance is also a dead worker (exit 1).
        also=(1,),
        subject=None,
        names=("killed while DRAINING", "RAILWAY_DEPLOYMENT_DRAINING_SECONDS", "WORKER_DRAIN_TIMEOUT_S"),
    )


def soft_memory_limit(s: Stage) -> tuple[Restarter, Expect]:
    # A leak: each job keeps 160 MB, and runs long enough for an RSS sample to catch it.
    s.jobs("drill:rss", count=30, rss_mb=160, sleep_s=2)
    return s.restarter(WORKER_MEMORY_LIMIT_MB="200", WORKER_BATCH_SIZE="1"), Expect(
        code="crash_loop", exit=1, names=("crashed", "MemoryError", "soft limit", "fix: raise")
    )


RAILWAY_DRILLS: dict[str, Callable[[Stage], tuple[Restarter, Expect]]] = {
    "oom_kill_loop": oom_kill_loop,
    "sigterm_loop": sigterm_loop,
    "sys_exit_job": sys_exit_job,
    "memory_error_job": memory_error_job,
    "import_error": import_error,
    "config_error": config_error,
    "kill_while_draining": kill_while_draining,
    "soft_memory_limit": soft_memory_limit,
}


def _waited(worker: WorkerProcess, event: str, stopping: threading.Event) -> bool:
    """Whether ``event`` came before the process ended or the drill stopped."""
    while not stopping.is_set() and worker.proc.poll() is None:
        if any(e.get("event") == event for e in list(worker.events)):
            return True
        time.sleep(0.05)
    return False


# --- running and judging -------------------------------------------------------------------


def run_drill(url: str, name: str, pace: Pace) -> Result:
    """Stage one drill and watch the inspector until its verdict has held, or time is up."""
    drill = Drill(url)
    result = Result(name)
    with _staged(drill, pace, name) as (restarter, expect):
        _judge(drill, restarter, expect, pace, result)
        result.instances = len(restarter.instances)
    return result


@contextmanager
def _staged(drill: Drill, pace: Pace, name: str) -> Iterator[tuple[Restarter, Expect]]:
    restarter, expect = RAILWAY_DRILLS[name](Stage(drill, pace, name))
    try:
        yield restarter, expect
    finally:
        restarter.stop()
        drill.close()


def _judge(drill: Drill, r: Restarter, expect: Expect, pace: Pace, result: Result) -> None:
    start_by = time.monotonic() + pace.within_s + 120  # the first failure itself must come
    named_at: float | None = None
    while True:
        now = time.monotonic()
        if r.failed_at is None:
            if now > start_by:
                result.message = "the failure never happened"
                return
            time.sleep(0.2)
            continue
        code, doc, err = drill.inspector()
        finding = _finding(doc or {}, expect)
        now = time.monotonic()
        if finding is not None and (code == expect.exit or code in expect.also):
            named_at = named_at or now
            result.after_s = result.after_s or round(named_at - r.failed_at, 1)
            result.exit, result.message = code, f"{expect.code}: {finding['message']}"
            result.held_s = round(now - named_at, 1)
            if result.held_s >= pace.hold_s:
                result.passed = result.after_s <= pace.within_s
                return
        elif named_at is not None:
            said = ", ".join(f"{f['code']} ({f['subject']})" for f in (doc or {}).get("reasons", []))
            result.notes.append(f"no longer named after {round(now - named_at, 1)} s: exit {code}; {said}")
            return
        else:
            result.exit = code
            result.message = err or "; ".join(f"{f['code']}: {f['message']}" for f in _all(doc or {}))
            if now - r.failed_at > pace.within_s:
                return
        time.sleep(0.5)


def _all(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [*doc.get("reasons", []), *doc.get("warnings", [])]


def _finding(doc: dict[str, Any], expect: Expect) -> dict[str, Any] | None:
    for f in _all(doc):
        if f["code"] != expect.code or expect.subject not in (None, f["subject"]):
            continue
        if all(n.lower() in f["message"].lower() for n in expect.names):
            return f
    return None


def table(results: list[Result]) -> str:
    """The results as a plain text table."""
    head = ("drill", "result", "verdict after", "held", "instances", "exit", "what the inspector says")
    rows = [
        (
            r.name,
            "PASS" if r.passed else "FAIL",
            "-" if r.after_s is None else f"{r.after_s:g} s",
            f"{r.held_s:g} s",
            str(r.instances),
            "-" if r.exit is None else str(r.exit),
            r.message + "".join(f" [{n}]" for n in r.notes),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in (head, *rows)
    )
