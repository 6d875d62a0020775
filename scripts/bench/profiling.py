"""The profile (``--profile``): one more no-op run, sampled by py-spy, with the worker's
statements counted; the main thread's time inside batches by step and by function. The
frame names it looks for are in ``frames.py``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from scripts.bench.database import BenchDatabase, statement_delta
from scripts.bench.figures import num
from scripts.bench.frames import (
    BATCH_FRAMES,
    GENERIC_FRAMES,
    RUN_LOOP_FRAME,
    SEND_FRAMES,
    STEP_NAMES,
    WAIT_FRAME,
)
from scripts.bench.plan import BENCH_MODULE, BENCH_QUEUE, DEFAULT_BATCH, Plan
from scripts.bench.workers import wait_processed, worker_env
from scripts.harness.process import WorkerProcess


def find_py_spy() -> str | None:
    """py-spy beside this interpreter, else on the PATH, else None."""
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
    statements = [
        {"statement": " ".join(q.split())[:120], "per_batch": c / batches, "ms_per_batch": ms / batches}
        for q, (c, ms) in sorted(delta.items(), key=lambda item: -item[1][1])
    ]
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
        if "MainThread" in thread and any(f.startswith(RUN_LOOP_FRAME) for f in frames):
            samples.append((frames, int(count)))
    return samples


def _step(frames: list[str]) -> str:
    """The call made by the processor's batch method: the step of the batch."""
    # Heuristic on frame names (frames.py): a renamed batch method shows as "(outside a batch)".
    batch = [i for i, f in enumerate(frames) if f.startswith(BATCH_FRAMES)]
    if not batch or batch[-1] + 1 >= len(frames):
        return "(outside a batch)"
    return STEP_NAMES.get(frames[batch[-1] + 1], frames[batch[-1] + 1])


def _kind(frames: list[str]) -> int:
    """0: waiting for a result, 1: in a libpq send, 2: Python, by the sample's leaf frame."""
    if frames[-1].startswith(WAIT_FRAME):
        return 0
    return 1 if frames[-1].startswith(SEND_FRAMES) else 2


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
        for f in {f for f in frames if not f.startswith(GENERIC_FRAMES)} if kind == 2 else ():
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
    """The profile: time by kind and by step of a batch, Python functions, statements."""
    print(
        f"\nprofile: no-op worker, batch {DEFAULT_BATCH}, {profile['jobs']:,} jobs"
        f" ({num(profile['rate_while_profiled'])} jobs/s while sampled) {profile['note']}"
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
