"""The worker replicas: each process and what was done to it (``Replica``), and the
``Supervisor`` that keeps every slot running as Railway's restart policy does."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from scripts.chaos.options import FREEZABLE, KINDS, TICK_S
from scripts.chaos.processes import ProcessRecord
from scripts.chaos.workload import CHAOS_EXTERNAL, CHAOS_WORKER
from scripts.harness.process import WorkerProcess


@dataclass
class Replica:
    """One worker process in a slot, and what was done to it."""

    kind: str
    slot: int
    proc: WorkerProcess
    spawned_wall: float = field(default_factory=time.time)
    frozen_until: float | None = None
    freezes: int = 0
    booted: bool = False
    worker_id: str | None = None
    signal: str | None = None
    final: bool = False  # the SIGTERM of the end of the run, not a chaos kill
    signalled_at: float | None = None
    signalled_wall: float | None = None
    exit_code: int | None = None
    exited_at: float | None = None

    def alive(self) -> bool:
        return self.exit_code is None

    def freeze(self, now: float, for_s: float) -> None:
        self.frozen_until, self.freezes = now + for_s, self.freezes + 1
        self.proc.send(signal.SIGSTOP)

    def thaw(self, now: float, *, early: bool = False) -> None:
        """SIGCONT when the freeze is over (or ``early``, at the end of the run)."""
        if self.frozen_until is not None and (early or now >= self.frozen_until):
            self.frozen_until = None
            if self.alive():
                self.proc.send(signal.SIGCONT)

    def poll(self, now: float) -> bool:
        """Update boot and exit state; True when the process has just exited."""
        if not self.booted:
            boots = self.proc.named("WORKER_BOOT")
            if boots:
                self.worker_id = boots[-1].get("worker_id")
                self.booted = boots[-1].get("db_status") == "ok"
        if self.exit_code is None and self.proc.proc.poll() is not None:
            self.exit_code, self.exited_at = self.proc.proc.returncode, now
            return True
        return False

    def send(self, name: str, now: float, *, final: bool = False) -> None:
        self.signal, self.final = name, final
        self.signalled_at, self.signalled_wall = now, time.time()
        self.proc.send(getattr(signal, name))

    def record(self) -> ProcessRecord:
        """The process's story, for the checks and the report."""
        shutdown = bool(self.proc.named("WORKER_SHUTDOWN"))
        crashes = self.proc.named("WORKER_CRASH")
        lines = list(self.proc.lines)
        if self.signal == "SIGKILL" and lines and not lines[-1].endswith("}"):
            lines.pop()  # a line cut by the kill
        bad = self.proc.bad_lines(lines)
        drain = (
            self.exited_at - self.signalled_at
            if self.exited_at is not None and self.signalled_at is not None
            else None
        )
        job_exit = bool(self.proc.named("CHAOS_JOB_EXIT")) and self.exit_code == 137
        timed_out = [c for c in crashes if c.get("error_type") == "JobTimedOut"]
        return ProcessRecord(
            kind=self.kind,
            slot=self.slot,
            pid=self.proc.pid,
            worker_id=self.worker_id,
            job_exit=job_exit,
            timed_out_keys=tuple(timed_out[-1].get("job_keys") or ()) if timed_out else (),
            booted=self.booted,
            signal=self.signal,
            final=self.final,
            exit_code=self.exit_code,
            drain_s=None if drain is None else round(drain, 3),
            spawned_wall=self.spawned_wall,
            signalled_wall=self.signalled_wall,
            shutdown_logged=shutdown,
            crash=crashes[-1].get("error") if crashes else None,
            outages=len(self.proc.named("DB_OUTAGE")),
            bad_lines=tuple(b[:200] for b in bad[:3]),
            tail=tuple(line[:300] for line in lines[-6:]),
        )


class Supervisor:
    """Keeps ``per_kind`` replicas of each worker running and restarts whatever exits, after
    a short delay, as Railway's restart policy does."""

    def __init__(
        self,
        env: Mapping[str, str],
        per_kind: int,
        seed: int,
        log: Callable[[str], None],
        secret: str | None = None,
        kind_env: Mapping[str, Mapping[str, str]] | None = None,
        logs: Path | None = None,
    ) -> None:
        self.env = dict(env)
        self.logs = logs
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
        self.kind_env = kind_env or {}  # kind -> variables of its own
        self.secrets = (secret,) if secret else ()
        self.slots = [(kind, i) for kind in KINDS for i in range(per_kind)]
        self.current: list[Replica | None] = [None] * len(self.slots)
        self.history: list[Replica] = []
        self.restart_at: dict[int, float] = {}
        self.restarting = True
        self.rng = random.Random(f"{seed}:restarts")
        self.log = log

    def start(self) -> None:
        for index in range(len(self.slots)):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        kind, slot = self.slots[index]
        chaos = kind in (CHAOS_WORKER, CHAOS_EXTERNAL)
        module = "scripts.chaos.worker" if chaos else f"backend.workers.{kind}"
        env = {**self.env, **self.kind_env.get(kind, {})}
        log = self.logs / f"{kind}-{slot}-{len(self.history)}.log" if self.logs else None
        replica = Replica(
            kind=kind, slot=slot, proc=WorkerProcess(module, env, secrets=self.secrets, log_path=log)
        )
        self.current[index] = replica
        self.history.append(replica)

    def tick(self, now: float) -> None:
        for replica in self.current:
            if replica is not None:
                replica.thaw(now)
        for index, replica in enumerate(self.current):
            if replica is not None and replica.poll(now):
                self.current[index] = None
                if not replica.final:
                    self.log(
                        f"{replica.kind}/{replica.slot} pid {replica.proc.pid} exited "
                        f"{replica.exit_code}" + (f" after {replica.signal}" if replica.signal else "")
                    )
                self.restart_at[index] = now + self.rng.uniform(0.2, 1.0)
        for index, due in list(self.restart_at.items()):
            if self.restarting and now >= due:
                del self.restart_at[index]
                self._spawn(index)

    def all_booted(self) -> bool:
        return all(r is not None and r.booted for r in self.current)

    def victim(self, slot: int, name: str) -> Replica | None:
        """The replica in ``slot``, or the next one that can take ``name`` now."""
        for step in range(len(self.slots)):
            replica = self.current[(slot + step) % len(self.slots)]
            # SIGTERM only after boot: before its handler is installed, Python dies of it.
            if (
                replica is not None
                and replica.alive()
                and replica.signal is None
                and (replica.frozen_until is None)
                and (replica.booted or name == "SIGKILL")
                and (name != "SIGSTOP" or (replica.booted and replica.kind in FREEZABLE))
                and (name != "SIGSTOP" or self._another_free(replica))
            ):
                return replica
        return None

    def _another_free(self, replica: Replica) -> bool:
        """Whether a replica of the same kind stays free to work: the longest stall counts
        the wait of a job while a worker of its queue was free, so a freeze never takes the
        last one (kills and restarts still may)."""
        return any(
            other is not None
            and other is not replica
            and other.kind == replica.kind
            and other.alive()
            and other.booted
            and other.frozen_until is None
            for other in self.current
        )

    def stop_all(self, timeout_s: float) -> None:
        """SIGTERM every replica and wait for them all; SIGKILL any that outlive ``timeout_s``."""
        self.restarting = False
        for replica in self.history:
            replica.thaw(time.monotonic(), early=True)
        deadline = time.monotonic() + timeout_s
        while any(r.alive() for r in self.history) and time.monotonic() < deadline:
            now = time.monotonic()
            self.tick(now)
            for running in self.current:
                # One still booting gets its SIGTERM once booted, as in ``victim``.
                if running is not None and running.alive() and running.signal is None and running.booted:
                    running.send("SIGTERM", now, final=True)
            time.sleep(TICK_S)
        for replica in self.history:
            if replica.alive():
                replica.proc.stop()  # the check reports it: it never finished its drain
                replica.poll(time.monotonic())

    def close(self) -> None:
        for replica in self.history:
            replica.proc.stop()
            replica.poll(time.monotonic())


def holds_connection(pid: int, local_ports: set[int], remote_port: int) -> bool:
    """Whether process ``pid`` has a TCP connection from one of ``local_ports`` to
    ``remote_port`` on 127.0.0.1 (read from /proc; False where there is none)."""
    sockets = set()
    try:
        with open("/proc/net/tcp", encoding="ascii") as table:
            next(table)
            for line in table:
                fields = line.split()
                local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
                if local in local_ports and remote == remote_port:
                    sockets.add(f"socket:[{fields[9]}]")
        fds = list(Path(f"/proc/{pid}/fd").iterdir()) if sockets else []
    except OSError:
        return False
    return any(_readlink(fd) in sockets for fd in fds)


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""  # closed meanwhile
