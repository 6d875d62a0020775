"""The inspector names what happened to a worker process, staged for real: SIGKILL (dead,
within two heartbeat intervals, at least 5 s) and SIGSTOP (frozen, with the statement that
ends its sessions), and a frozen worker that runs again is alive again and says it stalled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backend.enqueue import enqueue_many
from scripts.harness.process import WorkerProcess
from tests.helpers import job, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
Spawn = Callable[..., WorkerProcess]


def report(url: str) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "RAILWAY_", "WORKER_"))}
    done = subprocess.run(
        [sys.executable, "-m", "tools.worker_inspector", "--json"],
        cwd=ROOT,
        env={**env, "SUPABASE_MODE": "dev", "SUPABASE_DB_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def verdict_of(url: str, worker_id: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
    code, doc = report(url)
    worker = next((w for w in doc["workers"] if w["worker_id"] == worker_id), {"verdict": None})
    return code, worker, doc


def start(spawn: Spawn, url: str) -> tuple[WorkerProcess, str]:
    worker = spawn("backend.workers.collectability", WORKER_HEARTBEAT_INTERVAL_S=1)
    worker_id = worker.wait_boot()["worker_id"]
    wait_until(lambda: verdict_of(url, worker_id)[1]["verdict"] == "alive", timeout=10, interval=0.2)
    return worker, worker_id


def test_a_killed_worker_is_dead_within_two_heartbeat_intervals(spawn: Spawn, clean_db: str) -> None:
    worker, worker_id = start(spawn, clean_db)
    worker.send(signal.SIGKILL)
    killed_at = time.monotonic()
    code, seen, doc = wait_until(
        lambda: (r := verdict_of(clean_db, worker_id))[1]["verdict"] == "dead" and r, timeout=20, interval=0.5
    )
    took = time.monotonic() - killed_at
    assert took < 5 + 1 + 3  # the 5 s floor of two 1 s intervals, a beat, the inspector's own time
    assert code == 1 and seen["status"] == "RUNNING"
    assert "SIGKILL" in seen["note"]
    assert ("dead_worker", worker_id) in {(r["code"], r["subject"]) for r in doc["reasons"]}

    # Railway restarts it on the same replica: once that boot is clean, the dead instance
    # is a warning, no longer a reason.
    start(spawn, clean_db)
    code, doc = report(clean_db)
    assert code == 0, doc["reasons"]
    assert ("replaced_dead_worker", worker_id) in {(w["code"], w["subject"]) for w in doc["warnings"]}


def test_a_frozen_worker_is_reported_frozen_with_the_way_to_end_it(spawn: Spawn, clean_db: str) -> None:
    worker, worker_id = start(spawn, clean_db)
    worker.send(signal.SIGSTOP)
    try:
        code, seen, doc = wait_until(
            lambda: (r := verdict_of(clean_db, worker_id))[1]["verdict"] == "frozen" and r,
            timeout=20,
            interval=0.5,
        )
        assert code == 1
        reason = next(r for r in doc["reasons"] if r["code"] == "frozen_worker")
        assert reason["subject"] == worker_id and f"pid {worker.pid}" in reason["message"]
        assert f"WHERE application_name = '{worker_id}'" in seen["note"]
        assert "pg_terminate_backend" in seen["note"]
    finally:
        worker.send(signal.SIGCONT)
    stalled = worker.wait_for("WORKER_STALLED", timeout=10)
    assert stalled["stalled_s"] >= 4
    wait_until(lambda: verdict_of(clean_db, worker_id)[1]["verdict"] == "alive", timeout=10, interval=0.5)


def test_killed_workers_are_dead_at_once_at_the_default_heartbeat(spawn: Spawn, clean_db: str) -> None:
    """Three workers SIGKILLed with the default 30-s heartbeat, the inspector 2 s later:
    none is counted alive (their sessions are gone), and the queue's backlog shows."""
    workers = [spawn("backend.workers.collectability", WORKER_HEARTBEAT_INTERVAL_S=30) for _ in range(3)]
    ids = {w.wait_boot()["worker_id"] for w in workers}
    with psycopg.connect(clean_db, autocommit=True) as db:
        for worker in workers:
            worker.send(signal.SIGKILL)
            worker.wait_exit()
        # After the kills: sent before them, the live workers could take the jobs first.
        enqueue_many(db, "q_collectability", [job(f"backlog-{i}") for i in range(5)])
        time.sleep(2)
        code, doc = report(clean_db)
    verdicts = {w["worker_id"]: w["verdict"] for w in doc["workers"] if w["worker_id"] in ids}
    assert verdicts == dict.fromkeys(ids, "dead"), verdicts
    assert code == 1
    [queue] = [q for q in doc["queues"] if q["queue_name"] == "q_collectability"]
    assert queue["depth"] >= 5
