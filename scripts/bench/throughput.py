"""The throughput runs: the plain pgmq loop and the locking loop (the yardsticks), the no-op
and the collectability workers on a filled queue, the split of the worker's CPU per job
and per batch, the memory run (many jobs through one worker), and ``enqueue_many``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg

from backend.domain.seed import seed_demo
from backend.enqueue import build_envelope, enqueue_many
from scripts.bench.database import JUDGMENT_BODIES, BenchDatabase
from scripts.bench.plan import (
    BASE_QUEUE,
    BENCH_MODULE,
    BENCH_QUEUE,
    COLLECTABILITY_MODULE,
    DEFAULT_BATCH,
    MB,
    ORG,
    SCORE_QUEUE,
    VT_S,
    Collected,
    Plan,
    progress,
)
from scripts.bench.workers import wait_processed, worker_env
from scripts.harness.process import WorkerProcess

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
    """At each batch size: the baseline loop, the no-op worker and the locking loop. At the
    default batch size (the target's) the baseline runs again right after the worker, and
    the worker's ratio is to the mean of the two runs around it: the machine's speed drifts
    within seconds, and a baseline on each side cancels the part of the drift that is steady."""
    for batch in plan.batch_sizes:
        jobs = plan.jobs_for(batch)
        base = baseline_run(db, batch, jobs, f"base-{rep}-{batch}")
        out.runs.append(base)
        out.add(f"baseline_rate_{batch}", base["rate"])
        tag = f"w-{rep}-{batch}"
        run = worker_run(
            db,
            BENCH_MODULE,
            BENCH_QUEUE,
            batch,
            jobs,
            partial(db.fill_bench, BENCH_QUEUE, jobs, tag),
        )
        out.runs.append(run)
        bases = [base["rate"]]
        if batch == DEFAULT_BATCH:
            after = baseline_run(db, batch, jobs, f"base-after-{rep}-{batch}")
            out.runs.append(after)
            out.add(f"baseline_rate_{batch}", after["rate"])
            bases.append(after["rate"])
        base_rate = statistics.fmean(bases) if all(bases) else None
        if batch == DEFAULT_BATCH:
            out.around[rep] = base_rate
        locked = baseline_run(db, batch, jobs, f"lock-{rep}-{batch}", locking=True)
        out.runs.append(locked)
        out.add(f"locking_rate_{batch}", locked["rate"])
        out.add(f"worker_rate_{batch}", run["rate"])
        out.add(f"worker_cpu_us_{batch}", run["cpu_us_per_job"])
        out.add("boot_s", run["boot_s"])
        out.add("exit_s", run["exit_s"])
        if base_rate and run["rate"]:
            out.add(f"ratio_{batch}", run["rate"] / base_rate)
        if locked["rate"] and run["rate"]:
            out.add(f"locking_ratio_{batch}", run["rate"] / locked["rate"])
        progress(
            f"batch {batch:>3}: baseline {' and '.join(f'{b:,.0f}' for b in bases if b)}/s,"
            f" worker {run['rate']:,.0f}/s, locking loop {locked['rate']:,.0f}/s,"
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
    """``count`` judgments for the collectability runs (seeded once, analysed); their ids."""
    db.conn.execute(
        "TRUNCATE dragonfly.plaintiffs, dragonfly.debtors, dragonfly.judgments RESTART IDENTITY CASCADE"
    )
    seeded = seed_demo(db.conn, judgments=count, cases=0, org_id=ORG, seed=7)
    db.conn.execute("ANALYZE dragonfly.judgments")
    return list(seeded["judgment_ids"])


def collectability(db: BenchDatabase, plan: Plan, ids: list[int], out: Collected, rep: int) -> None:
    """The collectability worker scoring one job per judgment; checks one score each."""
    db.conn.execute("TRUNCATE dragonfly.collectability_scores")
    params = {"tag": f"score-{rep}", "org": ORG, "ids": ids}
    run = worker_run(
        db,
        COLLECTABILITY_MODULE,
        SCORE_QUEUE,
        DEFAULT_BATCH,
        len(ids),
        lambda: db.fill(SCORE_QUEUE, JUDGMENT_BODIES, params, len(ids)),
    )
    row = db.conn.execute("SELECT count(*) AS n FROM dragonfly.collectability_scores").fetchone()
    run["scores_stored"] = int(row["n"]) if row else 0
    if run["scores_stored"] != len(ids):
        out.notes.append(f"collectability run {rep}: {run['scores_stored']} scores for {len(ids)} jobs")
    out.runs.append(run)
    out.add("collectability_rate", run["rate"])
    out.add("collectability_cpu_us", run["cpu_us_per_job"])
    base_rate = out.around.get(rep)
    if base_rate and run["rate"]:
        out.add("collectability_ratio", run["rate"] / base_rate)
    progress(f"collectability: {run['rate']:,.0f} judgments/s")


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
    progress(f"soak: {done:,} jobs, RSS {rss_idle / MB:.1f} -> {rounds[-1]['rss_mb']:.1f} MB")


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
