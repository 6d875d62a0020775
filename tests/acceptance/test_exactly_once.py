"""Exactly-once effects under kills, slow jobs and replicas, with real worker processes."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from backend.enqueue import enqueue, enqueue_many
from scripts.harness.process import WorkerProcess
from tests.helpers import job, one, wait_until

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
Conn = psycopg.Connection[Any]


def test_sigkill_inside_a_transactional_handler_leaves_one_effect(spawn: Spawn, db: Conn) -> None:
    worker = spawn(WORKER_VISIBILITY_TIMEOUT_S=2)
    worker.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("tx-kill", sleep_s=30))
    worker.wait_for("PROBE_IN_HANDLER")  # the effect row is written, not committed
    worker.proc.send_signal(signal.SIGKILL)
    assert worker.wait_exit() == -signal.SIGKILL
    assert one(db, "SELECT count(*) FROM probe.effects") == 0

    db.execute("UPDATE pgmq.q_q_probe SET message = jsonb_set(message, '{payload,sleep_s}', '0')")
    again = spawn(WORKER_VISIBILITY_TIMEOUT_S=2)  # the killed worker's lease ends on its own
    again.wait_for("WORKER_BOOT")
    wait_until(lambda: one(db, "SELECT count(*) FROM pgmq.q_q_probe") == 0)
    again.send(signal.SIGTERM)
    assert again.wait_exit() == 0
    assert one(db, "SELECT count(*) FROM probe.effects WHERE job_key = 'tx-kill'") == 1
    assert one(db, "SELECT status FROM workers.processed_jobs WHERE job_key = 'tx-kill'") == "completed"


def test_sigkill_inside_an_external_handler_redelivers_with_the_same_key(spawn: Spawn, db: Conn) -> None:
    worker = spawn(PROBE_KIND="external", WORKER_VISIBILITY_TIMEOUT_S=2)
    worker.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("ext-kill", sleep_s=30))
    worker.wait_for("PROBE_IN_HANDLER")  # the receiver has the call
    worker.proc.send_signal(signal.SIGKILL)
    assert worker.wait_exit() == -signal.SIGKILL
    assert one(db, "SELECT status FROM workers.processed_jobs WHERE job_key = 'ext-kill'") == "processing"

    db.execute("UPDATE pgmq.q_q_probe SET message = jsonb_set(message, '{payload,sleep_s}', '0')")
    again = spawn(PROBE_KIND="external", WORKER_VISIBILITY_TIMEOUT_S=2)
    wait_until(
        lambda: (
            one(db, "SELECT status FROM workers.processed_jobs WHERE job_key = 'ext-kill'") == "completed"
        ),
        timeout=20,
    )
    again.send(signal.SIGTERM)
    assert again.wait_exit() == 0
    receiver = db.execute("SELECT * FROM probe.receiver").fetchall()
    assert [(r["job_key"], r["calls"]) for r in receiver] == [("ext-kill", 2)]
    assert one(db, "SELECT attempts FROM workers.processed_jobs WHERE job_key = 'ext-kill'") == 2
    assert one(db, "SELECT count(*) FROM pgmq.q_q_probe") == 0


def test_an_external_job_longer_than_the_visibility_timeout_runs_once(spawn: Spawn, db: Conn) -> None:
    """Its leases are extended while it runs. (A transactional job's bound: test_liveness.)"""
    workers = [spawn(PROBE_KIND="external", WORKER_VISIBILITY_TIMEOUT_S=1) for _ in range(2)]
    for w in workers:
        w.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("long", sleep_s=3.5))
    wait_until(
        lambda: one(db, "SELECT status FROM workers.processed_jobs WHERE job_key = 'long'") == "completed",
        timeout=40,
    )
    for w in workers:
        w.send(signal.SIGTERM)
        assert w.wait_exit() == 0
    assert one(db, "SELECT count(*) FROM probe.attempts WHERE job_key = 'long'") == 1
    assert one(db, "SELECT attempts FROM workers.processed_jobs WHERE job_key = 'long'") == 1


def test_three_replicas_process_two_thousand_jobs_exactly_once(spawn: Spawn, db: Conn) -> None:
    envelopes = [job(f"rep-{i}") for i in range(2000)]
    for start in range(0, 2000, 500):
        enqueue_many(db, "q_probe", envelopes[start : start + 500])
    workers = [spawn(WORKER_BATCH_SIZE=50) for _ in range(3)]
    wait_until(lambda: one(db, "SELECT count(*) FROM pgmq.q_q_probe") == 0, timeout=60)
    for w in workers:
        w.send(signal.SIGTERM)
    processed = []
    for w in workers:
        assert w.wait_exit() == 0
        processed.append(w.wait_for("WORKER_SHUTDOWN")["jobs_processed"])
    assert one(db, "SELECT count(*) FROM probe.effects") == 2000
    assert one(db, "SELECT count(DISTINCT job_key) FROM probe.effects") == 2000
    assert one(db, "SELECT count(*) FROM workers.processed_jobs WHERE status = 'completed'") == 2000
    assert sum(processed) == 2000
    assert sum(1 for n in processed if n > 0) >= 2, f"work was not shared: {processed}"
