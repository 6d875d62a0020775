"""One run: the replicas booted, the kill schedule played against them while the producer
enqueues, the queues drained, every replica stopped (``ChaosRun``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from scripts.chaos.audit import Conn
from scripts.chaos.database import DB_ERRORS, Database, connect, queued
from scripts.chaos.duties import DbRestarter, Producer
from scripts.chaos.options import (
    AIM_WAIT_S,
    BOOT_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    TICK_S,
    VISIBILITY_S,
    WAVE_SPREAD,
    WORKER_ENV,
    Options,
    SetupError,
    max_attempts,
)
from scripts.chaos.processes import DEAD_AFTER_S
from scripts.chaos.replicas import Replica, Supervisor, holds_connection
from scripts.chaos.schedule import Kill, Schedule
from scripts.chaos.workload import CHAOS_EXTERNAL, CHAOS_WORKER, Plan
from scripts.harness.process import inherited_env
from scripts.harness.receivers import HttpRecorder


@dataclass
class Timeline:
    """What happened when, as the checks and the report need it."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    freezes: list[dict[str, Any]] = field(default_factory=list)
    skipped_kills: int = 0
    db_restart: dict[str, Any] | None = None
    drained: bool = False
    drain_wait_s: float = 0.0
    elapsed_s: float = 0.0
    rescued: int = 0  # claims of killed workers given back at once (JOB_RESCUED lines)
    started_wall: float = 0.0  # the storm's start (time.time()): the kills' and freezes' at_s count from it


class ChaosRun:
    """Runs the schedule against the replicas while the producer enqueues the plan."""

    def __init__(
        self,
        opts: Options,
        db: Database,
        plan: Plan,
        schedule: Schedule,
        receiver: HttpRecorder,
        log: Callable[[str], None],
    ) -> None:
        self.opts, self.db, self.plan, self.schedule, self.log = opts, db, plan, schedule, log
        self.receiver = receiver
        env = inherited_env(
            **WORKER_ENV,
            WORKER_JOB_TIMEOUT_S=f"{opts.job_timeout_s:g}",
            # Shorter than the deadline, as the guide asks: a receiver that does not answer
            # fails the attempt, it does not hang the handler.
            OUTBOX_HTTP_TIMEOUT_S=f"{0.8 * opts.job_timeout_s:g}",
            SUPABASE_DB_URL=db.worker_url,
            OUTBOX_WEBHOOK_URL=receiver.url_for("/hooks/dragonfly"),
            OUTBOX_SLACK_WEBHOOK_URL=receiver.url_for("/slack/T000/B000/chaos"),
            CHAOS_RECEIVER_URL=receiver.url_for("/chaos/external"),
        )
        # The chaos workers' own: their kind, and the attempts their hung jobs use up.
        chaos_env = {"WORKER_MAX_ATTEMPTS": str(max_attempts(opts))}
        kind_env = {CHAOS_WORKER: chaos_env, CHAOS_EXTERNAL: {**chaos_env, "CHAOS_WORKER_KIND": "external"}}
        self.supervisor = Supervisor(
            env, opts.per_kind, opts.seed, log, secret=db.password, kind_env=kind_env, logs=opts.logs
        )
        self.abort = threading.Event()
        self.timeline = Timeline()
        self.restarter: DbRestarter | None = None

    def execute(self) -> Timeline:
        started = time.monotonic()
        try:
            self._boot()
            t0 = time.monotonic()
            self.timeline.started_wall = time.time()
            offsets = [
                i * WAVE_SPREAD * self.opts.duration_s / max(1, len(self.plan.waves) - 1)
                for i in range(len(self.plan.waves))
            ]
            producer = Producer(self.db.url, self.plan, offsets, t0, self.abort)
            producer.start()
            self.restarter = self._restarter(t0)
            self._storm(t0, producer)
            self._join(producer, self.restarter)
            self._drain(producer)
            self.supervisor.stop_all(BOOT_TIMEOUT_S + DRAIN_TIMEOUT_S + 10)
            self._wait_for_leases()
        finally:
            self.abort.set()
            if self.restarter is not None:
                self.restarter.join(timeout=30)  # the server is up again before anything else
            self.supervisor.close()
        self.timeline.elapsed_s = round(time.monotonic() - started, 1)
        return self.timeline

    def _boot(self) -> None:
        self.supervisor.start()
        deadline = time.monotonic() + 90
        while not self.supervisor.all_booted():
            now = time.monotonic()
            self.supervisor.tick(now)
            if now > deadline:
                raise SetupError("the workers did not boot within 90 s")
            time.sleep(TICK_S)
        self.log(f"{len(self.supervisor.slots)} workers running; chaos for {self.opts.duration_s:g} s")

    def _restarter(self, t0: float) -> DbRestarter | None:
        restart = self.schedule.db_restart
        if restart is None or self.db.server is None:
            return None
        restarter = DbRestarter(
            self.db.server, restart, t0, self.abort, lambda m: self.log(f"{time.monotonic() - t0:7.1f}s  {m}")
        )
        restarter.start()
        return restarter

    def _storm(self, t0: float, producer: Producer) -> None:
        kills = deque(self.schedule.kills)
        while (now := time.monotonic()) < t0 + self.opts.duration_s:
            self.supervisor.tick(now)
            if producer.error:
                raise SetupError(f"the producer failed: {producer.error}")
            while kills and now >= t0 + kills[0].at_s:
                kill = kills[0]
                victim = self._victim(kill, late_s=now - t0 - kill.at_s)
                if victim is None:
                    break  # nobody can take it yet: try again next tick
                kills.popleft()
                if kill.signal == "SIGSTOP":
                    victim.freeze(now, kill.freeze_s)
                    self.timeline.freezes.append(
                        {
                            "at_s": round(now - t0, 3),
                            "for_s": kill.freeze_s,
                            "worker": victim.kind,
                            "slot": victim.slot,
                            "pid": victim.proc.pid,
                        }
                    )
                    self.log(
                        f"{now - t0:7.1f}s  SIGSTOP {victim.kind}/{victim.slot} pid {victim.proc.pid}"
                        f" for {kill.freeze_s:g} s"
                    )
                    continue
                inside = self._inside_handler(victim)
                victim.send(kill.signal, now)
                self.timeline.kills.append(
                    {
                        "at_s": round(now - t0, 3),
                        "signal": kill.signal,
                        "aim": kill.aim,
                        "worker": victim.kind,
                        "slot": victim.slot,
                        "pid": victim.proc.pid,
                        "booted": victim.booted,
                        "inside_external_handler": inside,
                    }
                )
                self.log(
                    f"{now - t0:7.1f}s  {kill.signal} {victim.kind}/{victim.slot} pid {victim.proc.pid}"
                    + (" inside its handler" if inside else "")
                )
            time.sleep(TICK_S)
        self.timeline.skipped_kills = len(kills)

    def _victim(self, kill: Kill, late_s: float) -> Replica | None:
        """The replica to signal now, or None to wait: a kill aimed at a handler waits up to
        ``AIM_WAIT_S`` for an outbox replica inside one, then takes its scheduled slot."""
        if kill.aim == "handler":
            inside = next(
                (
                    r
                    for r in self.supervisor.current
                    if r is not None
                    and r.booted
                    and r.alive()
                    and r.signal is None
                    and self._inside_handler(r)
                ),
                None,
            )
            if inside is not None or late_s < AIM_WAIT_S:
                return inside
        return self.supervisor.victim(kill.slot, kill.signal)

    def _inside_handler(self, replica: Replica) -> bool:
        """Whether the replica is waiting for one of the receiver's slow replies."""
        ports = self.receiver.waiting_ports()
        return (
            bool(ports)
            and replica.kind == "outbox_processor"
            and holds_connection(replica.proc.pid, ports, self.receiver.port)
        )

    def _join(self, producer: Producer, restarter: DbRestarter | None) -> None:
        while producer.is_alive() or (restarter is not None and restarter.is_alive()):
            self.supervisor.tick(time.monotonic())
            time.sleep(TICK_S)
        if producer.error:
            raise SetupError(f"the producer failed: {producer.error}")
        if restarter is not None and self.schedule.db_restart is not None:
            self.timeline.db_restart = {
                **asdict(self.schedule.db_restart),
                "error": restarter.error,
                "stopped_wall": restarter.stopped_wall,
                "started_wall": restarter.started_wall,
            }

    def _drain(self, producer: Producer) -> None:
        """Keep the replicas running (no more kills) until the queues are empty."""
        started = time.monotonic()
        deadline = started + max(60.0, self.opts.duration_s / 2)
        conn: Conn | None = None
        while time.monotonic() < deadline:
            self.supervisor.tick(time.monotonic())
            try:
                conn = conn if conn is not None and not conn.closed else connect(self.db.url)
                if producer.waves_done == len(self.plan.waves) and queued(conn) == 0:
                    self.timeline.drained = True
                    break
            except DB_ERRORS:
                conn = None
            time.sleep(0.25)
        if conn is not None:
            conn.close()
        self.timeline.drain_wait_s = round(time.monotonic() - started, 1)
        self.log(
            f"queues {'drained' if self.timeline.drained else 'NOT drained'} in "
            f"{self.timeline.drain_wait_s:g} s; stopping the workers"
        )

    def _wait_for_leases(self) -> None:
        """Until every claim's lease and every SIGKILL'd heartbeat has had time to expire."""
        with connect(self.db.url) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM max(lease_expires_at))::float8 AS until"
                " FROM workers.processed_jobs WHERE status = 'processing'"
            ).fetchone()
        until = [row["until"] if row and row["until"] else 0.0]
        until += [
            (r.signalled_wall or 0.0) + DEAD_AFTER_S for r in self.supervisor.history if r.signal == "SIGKILL"
        ]
        wait = min(max(until) + 0.2 - time.time(), VISIBILITY_S + DEAD_AFTER_S + 1)
        if wait > 0:
            time.sleep(wait)
