"""Chaos run: SIGTERM/SIGKILL storms and a PostgreSQL restart under a mixed workload, then
proof that nothing was lost or done twice.

Starts ``--workers-per-kind`` replicas of each Dragonfly worker (``python -m
backend.workers.<name>``) against one database, a local HTTP receiver for the outbox, and
enqueues a seeded workload in waves over the first 70% of the run: collectability jobs for
seeded judgments, escalation jobs for seeded cases (each enqueues its own notification),
direct notifications (some answered slowly, so that kills land inside the external handler,
some refused once with 503), re-enqueued copies of some keys, and a few poison messages. For
``--duration`` seconds it sends SIGTERM or SIGKILL to a random replica every
``--kill-interval`` seconds or so, restarts whatever exits (as Railway's restart policy
would) and restarts PostgreSQL once. Then it lets the queues drain, stops every replica with
SIGTERM and checks:

- every job's effect exactly once: one score row per judgment, with its job key; one
  recommendation event per case and one outbox message for it; the ledger completes each
  key once; the receiver accepts every notification key, and never after its key was
  completed (a redelivery after a kill legitimately calls twice with the same key, so raw
  calls are reported apart). Committed effects are counted by audit triggers (schema
  ``chaos``), so an effect written twice is seen even when the second write overwrote it;
- nothing lost, dead letters only for the poison messages, no claim left stuck;
- every SIGTERM'd replica exited 0 or 143 after a WORKER_SHUTDOWN line; every SIGKILL'd
  replica's heartbeat row stopped advancing and reads as dead; a chaos worker replica ended
  by one of its killer jobs exited 137 right after saying so;
- liveness: transactional replicas are also frozen (SIGSTOP, then SIGCONT) for longer than
  the visibility timeout, never the last unfrozen one of its kind (the stall is measured
  while a worker of the queue is free), a chaos worker (``scripts/chaos_worker.py``) gets jobs that end its
  process, and the queues get undecodable and oversized bodies; the longest stall (how long
  a job took from its enqueue to its completion, less the retry delays it was given and the
  time PostgreSQL was down) must stay within the visibility timeout + 10 s;
- hung handlers: every worker runs with a short deadline (``--job-timeout``), and both chaos
  workers, the transactional one and its external twin, get jobs whose handler never
  returns, a Python loop (interrupted) and a socket read (blocked in C: the worker exits 1).
  Each is dead-lettered ``JobTimedOut`` (``AttemptsExhausted`` when its last attempt ended
  unrecorded, its worker killed or frozen meanwhile), never committed (transactional) or
  sent with its own key only (external); a replica's exit 1 is expected when its
  ``WORKER_CRASH`` names a hung job; the jobs of those two queues may wait deadline +
  visibility timeout + 10 s.

    python -m scripts.chaos [--duration 60] [--jobs 2000] [--workers-per-kind 2]
        [--kill-interval 4] [--job-timeout 2] [--max-attempts N] [--hung-jobs N]
        [--seed N] [--no-db-restart] [--report PATH]
    python -m scripts.chaos --url postgresql://... [--pgdata DIR] [--reset]

Without ``--url`` it runs its own embedded PostgreSQL in ``.data/chaos-pg`` (emptied first,
stopped at the end). With ``--url`` the database must be empty (or pass ``--reset``), and the
restart needs ``--pgdata``: the folder of the embedded server behind that URL, which is left
running. The receiver check compares this machine's clock with the database's, so the
database runs on this machine. The seed is printed: the same seed replays the same workload,
kill schedule and victims. The JSON report goes to ``--report`` (default
``chaos-results/chaos-<seed>.json``). Exit 0 when every invariant holds, 1 when one does
not, 2 when the run could not be made.

This module runs the replicas, the producer and the restart; the workload, the schedule and
the receiver's replies are in ``chaos_workload.py``, the checks and the table in
``chaos_checks.py``; the worker processes and the receiver are the harness's
(``scripts/harness/``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

from backend.config import QUEUES as WORKER_QUEUES
from backend.config import TUNABLES, WORKER_NAMES
from backend.db.embedded import EmbeddedPostgres
from backend.db.migrate import apply_migrations
from backend.dburl import redact_url
from backend.domain.seed import seed_demo
from backend.enqueue import enqueue_many
from scripts.chaos_checks import (
    DEAD_AFTER_S,
    HEARTBEAT_S,
    ProcessRecord,
    check_effects,
    check_hung,
    check_processes,
    check_stalls,
    install_audit,
    load_heartbeats,
    recovery_s,
    remove_audit,
    render,
)
from scripts.chaos_workload import (
    CHAOS_EXTERNAL,
    CHAOS_EXTERNAL_QUEUE,
    CHAOS_QUEUE,
    CHAOS_WORKER,
    HUNG_QUEUES,
    ORG_ID,
    SLOW_MAX_S,
    Call,
    ChaosReplies,
    DbRestart,
    Item,
    Kill,
    Plan,
    Schedule,
    build_plan,
    build_schedule,
    split_jobs,
)
from scripts.harness.process import WorkerProcess, inherited_env, with_password
from scripts.harness.receivers import HttpRecorder

ROOT = Path(__file__).resolve().parents[1]

PGDATA = ROOT / ".data" / "chaos-pg" / "pgdata"
RESULTS = ROOT / "chaos-results"
# The embedded server trusts local sockets, so any password is accepted: one that must never
# appear in a log line.
SENTINEL_PASSWORD = "chaos-Pw-never-printed"
VISIBILITY_S = 5
# Every worker's deadline. With the grace the runtime gives a handler after the interrupt
# (backend.workers.deadline, 2 s), below the visibility timeout: a transactional job run
# alone is leased for that long, so a handler blocked in C is recorded before its lease ends.
JOB_TIMEOUT_S, DEADLINE_GRACE_S = 2.0, 2.0
DRAIN_TIMEOUT_S = 15.0
BOOT_TIMEOUT_S = 30.0  # a replica restarted while PostgreSQL is down waits for it
WORKER_ENV = {
    "SUPABASE_MODE": "dev",
    "WORKER_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
    "WORKER_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),  # a SIGKILL'd job is back within 5 s
    "WORKER_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
    "WORKER_BOOT_TIMEOUT_S": str(BOOT_TIMEOUT_S),
    "WORKER_RETRY_BASE_S": "0.5",
    "WORKER_RETRY_MAX_S": "5",
    "PYTHONUNBUFFERED": "1",
}
WAVE_SPREAD = 0.7  # the workload arrives over the first 70% of the run
QUEUES = (*WORKER_QUEUES, CHAOS_QUEUE, CHAOS_EXTERNAL_QUEUE)
KINDS = (*WORKER_NAMES, CHAOS_WORKER, CHAOS_EXTERNAL)
# Freezes are for transactional workers: a frozen external worker that wakes after its lease
# was taken over may still send (with the same key), which the receiver would count twice.
FREEZABLE = ("collectability", "escalation", CHAOS_WORKER)
STALL_ALLOWANCE_S = 10.0
TICK_S = 0.05
AIM_WAIT_S = 3.0


class SetupError(Exception):
    """The run could not be made (bad options, a database in use, workers that never boot)."""


# --- options ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to run: the command line, validated."""

    duration_s: float = 60.0
    jobs: int = 2000
    per_kind: int = 2
    kill_interval_s: float = 4.0
    job_timeout_s: float = JOB_TIMEOUT_S
    max_attempts: int | None = None  # each worker's own default
    hung_each: int = 1
    seed: int = 1
    url: str | None = None
    pgdata: Path | None = None
    db_restart: bool = True
    reset: bool = False
    report: Path | None = None
    logs: Path | None = None  # a folder for every replica's output

    def replay_command(self) -> str:
        """The command line that replays this run (the URL without its password)."""
        args = [
            "python",
            "-m",
            "scripts.chaos",
            "--seed",
            str(self.seed),
            "--duration",
            f"{self.duration_s:g}",
            "--jobs",
            str(self.jobs),
            "--workers-per-kind",
            str(self.per_kind),
            "--kill-interval",
            f"{self.kill_interval_s:g}",
            "--job-timeout",
            f"{self.job_timeout_s:g}",
            "--hung-jobs",
            str(self.hung_each),
        ]
        if self.max_attempts:
            args += ["--max-attempts", str(self.max_attempts)]
        if self.url:
            args += ["--url", redact_url(self.url)]
        if self.pgdata:
            args += ["--pgdata", str(self.pgdata)]
        if not self.db_restart:
            args.append("--no-db-restart")
        if self.reset:
            args.append("--reset")
        return shlex.join(args)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.chaos",
        description="Kill workers and restart PostgreSQL under load; check exactly-once effects.",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of kills (default 60)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2000,
        help="distinct jobs enqueued (default 2000), besides copies, derived notifications and poison",
    )
    parser.add_argument("--workers-per-kind", type=int, default=2, help="replicas of each worker (default 2)")
    parser.add_argument(
        "--kill-interval", type=float, default=4.0, help="mean seconds between kills (default 4)"
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=JOB_TIMEOUT_S,
        help=f"WORKER_JOB_TIMEOUT_S of every worker (default {JOB_TIMEOUT_S:g}; with the runtime's"
        f" {DEADLINE_GRACE_S:g} s of grace, below the visibility timeout, {VISIBILITY_S} s)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        help="WORKER_MAX_ATTEMPTS of the chaos workers, whose jobs hang (default: the runtime's, 5)",
    )
    parser.add_argument(
        "--hung-jobs",
        type=int,
        help="hung jobs of each way on each chaos worker (default 2 in a run of 2 minutes or more, else 1)",
    )
    parser.add_argument("--seed", type=int, help="seed of the workload and the kills (default: random)")
    parser.add_argument("--url", help="database to use (default: an embedded server in .data/chaos-pg)")
    parser.add_argument(
        "--pgdata", type=Path, help="folder of the embedded server behind --url: the one to restart"
    )
    parser.add_argument("--no-db-restart", action="store_true", help="do not restart PostgreSQL")
    parser.add_argument(
        "--reset",
        action="store_true",
        help="empty the workers and dragonfly tables and the queues of --url first",
    )
    parser.add_argument("--report", type=Path, help="JSON report (default chaos-results/chaos-<seed>.json)")
    parser.add_argument("--logs", type=Path, help="a folder to keep every replica's output in, one file each")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.kill_interval <= 0:
        parser.error("--duration and --kill-interval must be positive")
    if args.jobs < 10 or args.workers_per_kind < 1:
        parser.error("--jobs must be at least 10 and --workers-per-kind at least 1")
    hung_each = args.hung_jobs if args.hung_jobs is not None else 2 if args.duration >= 120 else 1
    if (
        not 1 <= args.job_timeout < VISIBILITY_S - DEADLINE_GRACE_S
        or (args.max_attempts or 1) < 1
        or hung_each < 0
    ):
        parser.error(
            f"--job-timeout must be at least 1 and below {VISIBILITY_S - DEADLINE_GRACE_S:g} (the visibility"
            " timeout less the grace after the deadline), --max-attempts at least 1, --hung-jobs at least 0"
        )
    if args.url and args.pgdata is None and not args.no_db_restart:
        parser.error(
            "restarting PostgreSQL behind --url needs --pgdata DIR (its embedded server's "
            "folder); or pass --no-db-restart"
        )
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    return Options(
        duration_s=args.duration,
        jobs=args.jobs,
        per_kind=args.workers_per_kind,
        kill_interval_s=args.kill_interval,
        job_timeout_s=args.job_timeout,
        max_attempts=args.max_attempts,
        hung_each=hung_each,
        seed=seed,
        url=args.url,
        pgdata=args.pgdata,
        db_restart=not args.no_db_restart,
        reset=args.reset,
        report=args.report,
        logs=args.logs,
    )


def stall_limits(opts: Options) -> dict[str, float]:
    """The queues where jobs hang, and their stall limit: a job there may also wait for a
    hung handler's deadline, so deadline + visibility timeout + 10 s."""
    limit = opts.job_timeout_s + VISIBILITY_S + STALL_ALLOWANCE_S
    return dict.fromkeys(HUNG_QUEUES, limit) if opts.hung_each else {}


def max_attempts(opts: Options) -> int:
    """The chaos workers' WORKER_MAX_ATTEMPTS (by default the runtime's)."""
    default = next(t.default for t in TUNABLES if t.variable == "WORKER_MAX_ATTEMPTS")
    return opts.max_attempts or int(default)


# --- the database ---------------------------------------------------------------------------

DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
Conn = psycopg.Connection[Any]


def connect(url: str) -> Conn:
    return psycopg.connect(
        url, autocommit=True, row_factory=dict_row, connect_timeout=5, application_name="chaos"
    )


def reset_database(conn: Conn) -> None:
    """Empty the runtime's, the domain's and the audit's tables, and the three queues."""
    rows = conn.execute(
        "SELECT format('%%I.%%I', schemaname, tablename) AS name FROM pg_tables"
        " WHERE schemaname = ANY(%s) AND tablename <> 'schema_migrations'",
        (["workers", "dragonfly", "chaos"],),
    ).fetchall()
    conn.execute(f"TRUNCATE {', '.join(r['name'] for r in rows)} RESTART IDENTITY CASCADE")
    for queue in QUEUES:
        conn.execute("SELECT pgmq.purge_queue(%s)", (queue,))
        conn.execute(f'TRUNCATE pgmq."a_{queue}"')


def leftovers(conn: Conn) -> list[str]:
    """What makes this database unfit for a run: earlier state, or workers running on it."""
    depth = " + ".join(f'(SELECT count(*) FROM pgmq."q_{q}")' for q in QUEUES)
    row = conn.execute(
        "SELECT (SELECT count(*) FROM workers.processed_jobs) AS ledger_rows,"
        " (SELECT count(*) FROM workers.dead_letters) AS dead_letters,"
        " (SELECT count(*) FROM dragonfly.judgments) AS judgments,"
        f" {depth} AS queued_messages,"
        " (SELECT count(*) FROM workers.heartbeats WHERE status IN ('BOOTING', 'RUNNING', 'DRAINING')"
        "  AND last_heartbeat_at > clock_timestamp() - interval '5 seconds') AS live_workers"
    ).fetchone()
    assert row is not None
    return [f"{n} {name.replace('_', ' ')}" for name, n in row.items() if n]


def queued(conn: Conn) -> int:
    """Messages in the three queues, visible or not."""
    row = conn.execute(
        "SELECT " + " + ".join(f'(SELECT count(*) FROM pgmq."q_{q}")' for q in QUEUES) + " AS n"
    ).fetchone()
    return int(row["n"]) if row else 0


def enqueue_wave(conn: Conn, index: int, items: Sequence[Item]) -> bool:
    """Enqueue one wave in one transaction, once: a retry of a wave that committed does nothing."""
    with conn.transaction():
        if conn.execute("SELECT 1 FROM chaos.waves WHERE wave = %s", (index,)).fetchone():
            return False
        conn.execute("INSERT INTO chaos.waves (wave) VALUES (%s)", (index,))
        envelopes: dict[str, list[Any]] = defaultdict(list)
        for item in items:
            if item.key is None:  # malformed on purpose: enqueue_many would refuse it
                conn.execute("SELECT pgmq.send(%s, %s::jsonb, 0)", (item.queue, item.text))
            else:
                envelopes[item.queue].append(item.body)
        for queue, bodies in envelopes.items():
            enqueue_many(conn, queue, bodies)
    return True


@dataclass
class Database:
    """The database of the run, and the embedded server to restart (when there is one)."""

    url: str
    server: EmbeddedPostgres | None
    owned: bool

    @classmethod
    def open(cls, opts: Options) -> Database:
        if opts.url:
            server = EmbeddedPostgres(opts.pgdata) if opts.pgdata else None
            if server is not None and server.url() is None:
                raise SetupError(f"no PostgreSQL is running in {opts.pgdata}")
            return cls(url=opts.url, server=server, owned=False)
        if opts.pgdata:
            server = EmbeddedPostgres(opts.pgdata)
            return cls(url=server.start(), server=server, owned=False)
        server = EmbeddedPostgres(PGDATA)
        return cls(url=server.start(), server=server, owned=True)

    @property
    def worker_url(self) -> str:
        """The URL the workers get: with a sentinel password when the server trusts any."""
        if self.server is None or urlsplit(self.url).password:
            return self.url
        return with_password(self.url, SENTINEL_PASSWORD)

    @property
    def password(self) -> str | None:
        return urlsplit(self.worker_url).password or None

    def prepare(self, reset: bool) -> None:
        """Schema, queues and audit in place; the database empty (or emptied)."""
        with connect(self.url) as conn:
            apply_migrations(conn, queues=QUEUES)
            found = leftovers(conn)
            if any("live workers" in f for f in found):
                raise SetupError(
                    f"workers are running against this database ({', '.join(found)}); stop them first"
                )
            if found and not (reset or self.owned):
                raise SetupError(f"the database is not empty ({', '.join(found)}); pass --reset to empty it")
            if found or self.owned:
                reset_database(conn)
            install_audit(conn)

    def close(self) -> None:
        if self.owned and self.server is not None:
            self.server.stop("fast")  # the data stays in .data/chaos-pg for a look afterwards
            return
        try:
            with connect(self.url) as conn:
                remove_audit(conn)
        except psycopg.Error as exc:
            print(f"chaos: could not drop the chaos schema: {exc}", file=sys.stderr)


# --- background duties: the producer and the database restart ------------------------------


class Producer(threading.Thread):
    """Enqueues the plan's waves at their times, as an application would, retrying outages."""

    def __init__(
        self, url: str, plan: Plan, offsets: Sequence[float], t0: float, abort: threading.Event
    ) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.plan, self.offsets, self.t0, self.abort = url, plan, offsets, t0, abort
        self.waves_done = 0
        self.error: str | None = None

    def run(self) -> None:
        conn: Conn | None = None
        try:
            for index, (offset, items) in enumerate(zip(self.offsets, self.plan.waves, strict=True)):
                if self.abort.wait(max(0.0, self.t0 + offset - time.monotonic())):
                    return
                conn = self._enqueue(conn, index, items)
                if self.abort.is_set():
                    return
                self.waves_done += 1
        except Exception as exc:  # reported as a failed run, not a silent thread death
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if conn is not None:
                conn.close()

    def _enqueue(self, conn: Conn | None, index: int, items: Sequence[Item]) -> Conn | None:
        while not self.abort.is_set():
            try:
                conn = conn if conn is not None and not conn.closed else connect(self.url)
                enqueue_wave(conn, index, items)
                return conn
            except DB_ERRORS:
                if conn is not None:
                    conn.close()
                conn = None
                self.abort.wait(0.5)
        return conn


class DbRestarter(threading.Thread):
    """Stops PostgreSQL at the scheduled time and starts it again after the downtime."""

    def __init__(
        self,
        server: EmbeddedPostgres,
        restart: DbRestart,
        t0: float,
        abort: threading.Event,
        log: Callable[[str], None],
    ) -> None:
        super().__init__(name="db-restart", daemon=True)
        self.server, self.restart, self.t0, self.abort, self.log = server, restart, t0, abort, log
        self.stopped_wall: float | None = None
        self.started_wall: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        if self.abort.wait(max(0.0, self.t0 + self.restart.at_s - time.monotonic())):
            return
        self.log(f"PostgreSQL stop ({self.restart.mode})")
        try:
            self.server.stop(self.restart.mode)
            self.stopped_wall = time.time()
            self.abort.wait(self.restart.down_s)  # the outage itself
        except Exception as exc:  # recorded; the server is started below regardless
            self.error = f"stop: {type(exc).__name__}: {exc}"
        try:
            self.server.start()
            self.started_wall = time.time()
            self.log("PostgreSQL started again")
        except Exception as exc:
            self.error = f"start: {type(exc).__name__}: {exc}"


# --- the replicas ---------------------------------------------------------------------------


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
        module = "scripts.chaos_worker" if chaos else f"backend.workers.{kind}"
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


# --- one run --------------------------------------------------------------------------------


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


# --- the report -----------------------------------------------------------------------------


def build_report(
    opts: Options,
    db: Database,
    plan: Plan,
    timeline: Timeline,
    effects: Mapping[str, Any],
    processes: Mapping[str, Any],
    recovery: float | None,
    stalls: Mapping[str, Any],
    hung: Mapping[str, Any],
) -> dict[str, Any]:
    kills = Counter(k["signal"] for k in timeline.kills)
    violations = list(effects["violations"]) + list(stalls["violations"]) + list(hung["violations"])
    if processes["problem_count"]:
        violations.append(f"{processes['problem_count']} process problem(s)")
    if not timeline.drained:
        violations.append("the queues did not drain")
    if not kills["SIGTERM"] or not kills["SIGKILL"]:
        violations.append("not both kinds of kill happened")
    restart = dict(timeline.db_restart or {})
    if opts.db_restart:
        if not restart or restart.get("error"):
            violations.append(f"the database restart failed: {restart.get('error', 'not run')}")
        elif recovery is None:
            violations.append("no job completed after the database restart")
        restart["recovery_s"] = recovery
    return {
        "seed": opts.seed,
        "command": opts.replay_command(),
        "passed": not violations,
        "violations": violations,
        "finished_at": datetime.now(UTC).isoformat(),
        "elapsed_s": timeline.elapsed_s,
        "options": {
            "duration_s": opts.duration_s,
            "jobs": opts.jobs,
            "workers_per_kind": opts.per_kind,
            "kill_interval_s": opts.kill_interval_s,
            "job_timeout_s": opts.job_timeout_s,
            "max_attempts": opts.max_attempts,
            "hung_jobs_each": opts.hung_each,
            "db_restart": opts.db_restart,
        },
        "database": {"url": redact_url(db.url), "own_server": db.owned},
        "freezes": {"count": len(timeline.freezes), "log": timeline.freezes},
        "killer_jobs": {"count": len(plan.killers), "worker_exits": processes["job_exits"]},
        "hung_jobs": {**hung, "worker_exits": processes["hung_exits"]},
        "stalls": stalls,
        "kills": {
            "total": len(timeline.kills),
            "SIGTERM": kills["SIGTERM"],
            "SIGKILL": kills["SIGKILL"],
            "skipped": timeline.skipped_kills,
            "inside_external_handler": sum(1 for k in timeline.kills if k["inside_external_handler"]),
            "claims_rescued": timeline.rescued,
            "by_worker": dict(Counter(f"{k['worker']} {k['signal']}" for k in timeline.kills)),
            "log": timeline.kills,
        },
        "processes": processes,
        "jobs": {
            **effects["jobs"],
            "messages_enqueued": plan.messages,
            "copies": plan.copies,
            "poison": len(plan.poison),
            "slow": len(plan.slow),
            "flaky": len(plan.flaky),
            "by_worker": {
                "collectability": len(plan.scores),
                "escalation": len(plan.escalations),
                "outbox_processor": len(plan.deliveries),
                CHAOS_WORKER: len(plan.chaos_jobs),
                CHAOS_EXTERNAL: len(plan.external_jobs),
            },
        },
        "effects": effects["effects"],
        "duplicates": effects["duplicates"],
        "lost": effects["lost"],
        "dead_letters": effects["dead_letters"],
        "stuck_claims": effects["stuck_claims"],
        "drain": {
            **processes["drain"],
            "queues_drained": timeline.drained,
            "wait_after_chaos_s": timeline.drain_wait_s,
        },
        "db_restart": restart or None,
    }


# --- main -----------------------------------------------------------------------------------


def run(opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make one chaos run and return its report."""
    db = Database.open(opts)
    try:
        db.prepare(opts.reset)
        n_scores, n_escalations, n_notes = split_jobs(opts.jobs)
        with connect(db.url) as conn:
            seeded = seed_demo(conn, judgments=n_scores, cases=n_escalations, org_id=ORG_ID, seed=opts.seed)
        plan = build_plan(
            seed=opts.seed,
            judgment_ids=seeded["judgment_ids"],
            case_ids=seeded["case_ids"],
            notes=n_notes,
            waves=max(2, min(100, int(opts.duration_s / 2))),
            hung_each=opts.hung_each,
            slow_max_s=min(SLOW_MAX_S, opts.job_timeout_s / 2),  # well within the outbox's deadline
        )
        slots = len(KINDS) * opts.per_kind
        schedule = build_schedule(
            seed=opts.seed,
            duration_s=opts.duration_s,
            kill_interval_s=opts.kill_interval_s,
            slots=slots,
            db_restart=opts.db_restart and db.server is not None,
            visibility_s=VISIBILITY_S,
        )
        log(
            f"{len(plan.expected_keys)} jobs ({plan.messages} messages) in {len(plan.waves)} waves; "
            f"{len(schedule.kills)} kills scheduled"
        )
        with HttpRecorder(responder=ChaosReplies()) as receiver:
            chaos = ChaosRun(opts, db, plan, schedule, receiver, log)
            timeline = chaos.execute()
            calls = [Call.of(r) for r in receiver.requests]
        records = [r.record() for r in chaos.supervisor.history]
        retries = [e for r in chaos.supervisor.history for e in r.proc.named("JOB_FAILED")]
        chaos_replicas = [r for r in chaos.supervisor.history if r.kind in (CHAOS_WORKER, CHAOS_EXTERNAL)]
        hangs = [e for r in chaos_replicas for e in r.proc.named("CHAOS_JOB_HANG")]
        timeouts = [e for r in chaos_replicas for e in r.proc.named("JOB_TIMED_OUT")]
        elsewhere = sum(
            len(r.proc.named("JOB_TIMED_OUT")) for r in chaos.supervisor.history if r not in chaos_replicas
        )
        timeline.rescued = sum(len(r.proc.named("JOB_RESCUED")) for r in chaos.supervisor.history)
        restart = timeline.db_restart or {}
        with connect(db.url) as conn:
            effects = check_effects(conn, plan, calls)
            processes = check_processes(records, load_heartbeats(conn), time.time(), hung=set(plan.hung))
            hung = check_hung(conn, plan, calls, hangs, timeouts, max_attempts(opts))
            hung["timed_out"]["dragonfly_workers"] = elsewhere  # no job of theirs hangs
            recovery = recovery_s(conn, restart.get("started_wall"))
            stalls = check_stalls(
                conn,
                plan,
                retries,
                outage=(restart.get("stopped_wall"), restart.get("started_wall")),
                limit_s=VISIBILITY_S + STALL_ALLOWANCE_S,
                started_wall=timeline.started_wall,
                limits=stall_limits(opts),
            )
        return build_report(opts, db, plan, timeline, effects, processes, recovery, stalls, hung)
    finally:
        db.close()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    print(f"chaos seed {opts.seed}; replay with: {opts.replay_command()}", flush=True)
    try:
        report = run(opts, log=lambda line: print(line, flush=True))
    except (SetupError, psycopg.Error, OSError) as exc:
        print(f"chaos: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    path = opts.report or RESULTS / f"chaos-{opts.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(render(report))
    print(f"  report: {path}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
