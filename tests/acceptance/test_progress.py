"""A working worker says so: WORKER_PROGRESS lines at the stated interval while jobs flow,
none while idle, the heartbeat row's counters fresh with them; per-job lines at DEBUG."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
import pytest

from backend.enqueue import build_envelope, enqueue, enqueue_many
from scripts.harness.process import WorkerProcess
from tests.helpers import wait_until

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
Conn = psycopg.Connection[Any]


def job(key: str, **payload: Any) -> dict[str, Any]:
    return build_envelope(
        entity_type="probe", entity_id="1", org_id="org-1", idempotency_key=key, payload=payload
    )


def depth(db: Conn) -> int:
    return int(db.execute("SELECT count(*) AS n FROM pgmq.q_q_probe").fetchone()["n"])


def test_progress_lines_come_at_the_interval_while_jobs_flow_and_stop_when_idle(
    spawn: Spawn, db: Conn
) -> None:
    worker = spawn(PROBE_KIND="external", WORKER_PROGRESS_INTERVAL_S="0.5")
    worker.wait_boot()
    enqueue_many(db, "q_probe", [job(f"p-{n}", sleep_s=0.2) for n in range(15)])  # about 3 s of work
    wait_until(lambda: depth(db) == 0, timeout=30)
    drained_at = time.time()
    time.sleep(2.0)
    lines = [e for e in worker.events if e["event"] == "WORKER_PROGRESS"]
    data = [e["data"] for e in lines]
    assert len(data) >= 3, data
    assert sum(d["done"] for d in data) == 15 and data[-1]["jobs_processed"] == 15
    assert all(d["done"] > 0 and d["rate_per_s"] > 0 and d["failed"] == 0 for d in data)
    assert all(0.4 <= d["seconds"] <= 1.5 for d in data[1:]), [d["seconds"] for d in data]
    assert data[0]["queue_depth"] > 0 and data[-1]["queue_depth"] == 0
    # Idle: at most the line that counted the last jobs comes after the queue emptied.
    late = [e for e in lines if datetime.fromisoformat(e["timestamp"]).timestamp() > drained_at + 1.0]
    assert late == []
    row = db.execute(
        "SELECT jobs_processed FROM workers.heartbeats WHERE worker_id = %s", (data[-1]["worker_id"],)
    ).fetchone()
    assert row["jobs_processed"] == 15


def test_per_job_lines_at_debug_say_completed_and_skipped(spawn: Spawn, db: Conn) -> None:
    enqueue(db, "q_probe", job("once"))
    worker = spawn(WORKER_LOG_LEVEL="DEBUG")
    worker.wait_boot()
    worker.wait_for("JOB_COMPLETED", lambda d: d["job_key"] == "once")
    enqueue(db, "q_probe", job("once"))  # the same key again: deleted without running
    skipped = worker.wait_for("JOB_SKIPPED", lambda d: d["job_key"] == "once")
    assert "already completed" in skipped["reason"]
    wait_until(lambda: depth(db) == 0)
    assert db.execute("SELECT count(*) AS n FROM probe.effects").fetchone()["n"] == 1
