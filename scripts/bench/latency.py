"""The latency runs: an idle worker's pickup latency for spaced single messages, its RSS
after boot, and the statements it sends while idle (pg_stat_statements, counted role)."""

from __future__ import annotations

import random
import time
from typing import Any

from psycopg.types.json import Jsonb

from backend.enqueue import build_envelope
from scripts.bench.database import BenchDatabase, statement_delta
from scripts.bench.figures import percentile
from scripts.bench.plan import (
    BENCH_MODULE,
    BENCH_QUEUE,
    FIRST_PRUNE_S,
    MB,
    ORG,
    PICKUP_EVENT,
    Collected,
    Plan,
    progress,
)
from scripts.bench.workers import worker_env
from scripts.harness.process import WorkerProcess


def send_probes(db: BenchDatabase, plan: Plan, rng: random.Random, tag: str) -> None:
    """Single messages, spaced apart, each carrying its send time."""
    for i in range(plan.probes):
        time.sleep(rng.uniform(*plan.probe_gap_s))
        envelope = build_envelope(
            entity_type="bench", entity_id=str(i), org_id=ORG, idempotency_key=f"{tag}-{i}"
        )
        envelope["payload"]["sent"] = time.time()
        db.conn.execute("SELECT pgmq.send(%s, %s)", (BENCH_QUEUE, Jsonb(envelope)))


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
    progress(
        f"{mode}: pickup p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms"
        + (f", idle {idle['per_s_besides_heartbeats']:.2f} statements/s" if idle else "")
    )
