"""The run's settings (the workers' environment, the visibility timeout, the deadline) and
its command line, validated into ``Options``."""

from __future__ import annotations

import argparse
import random
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from backend.config import QUEUES as WORKER_QUEUES
from backend.config import WORKER_NAMES
from backend.dburl import redact_url
from backend.tunables import TUNABLES
from scripts.chaos.processes import HEARTBEAT_S
from scripts.chaos.workload import (
    CHAOS_EXTERNAL,
    CHAOS_EXTERNAL_QUEUE,
    CHAOS_QUEUE,
    CHAOS_WORKER,
    HUNG_QUEUES,
)

ROOT = Path(__file__).resolve().parents[2]

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
