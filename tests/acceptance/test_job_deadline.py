"""A handler that never returns, in a live process, stalls nothing: real worker processes,
one replica restarted a few seconds after each exit, as the platform does.

One job among 20 never returns: a Python loop (interrupted at the deadline, the worker
goes on) or a socket read with no timeout (blocked in C: the worker records the attempt
and exits 1). The 19 others complete exactly once within deadline + visibility timeout +
10 s of being enqueued; the hung job is dead-lettered ``JobTimedOut`` after
``WORKER_MAX_ATTEMPTS`` attempts, and ``JOB_TIMED_OUT`` names the handler's file and line.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from backend.enqueue import enqueue_many
from scripts.harness.process import ROOT, WorkerProcess
from tests.acceptance.test_liveness import depth, effects_per_key, inspector
from tests.helpers import PASSWORD, job, one, wait_until, worker_env

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
Conn = psycopg.Connection[Any]

DEADLINE_S, VISIBILITY_S, MAX_ATTEMPTS, RESTART_S = 5, 15, 3, 2.0
HUNG = "j06"


def _dead_letter(db: Conn) -> dict[str, Any] | None:
    row: dict[str, Any] | None = db.execute("SELECT * FROM workers.dead_letters").fetchone()
    return row


def _run_with_restarts(spawn: Spawn, db: Conn, kind: str, timeout_s: float) -> list[WorkerProcess]:
    """One replica, started again ``RESTART_S`` after each exit, until the queue is empty
    and the hung job dead-lettered."""
    workers: list[WorkerProcess] = []
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        worker = spawn(
            PROBE_KIND=kind,
            WORKER_JOB_TIMEOUT_S=DEADLINE_S,
            WORKER_VISIBILITY_TIMEOUT_S=VISIBILITY_S,
            WORKER_MAX_ATTEMPTS=MAX_ATTEMPTS,
            WORKER_RETRY_BASE_S=1,
        )
        workers.append(worker)
        worker.wait_boot()
        wait_until(
            lambda w=worker: w.proc.poll() is not None or (depth(db) == 0 and _dead_letter(db)),
            timeout=max(1.0, until - time.monotonic()),
            interval=0.1,
        )
        if worker.proc.poll() is None:
            worker.send(signal.SIGTERM)
            assert worker.wait_exit() == 0
            return workers
        assert worker.wait_exit() == 1, worker.tail()
        time.sleep(RESTART_S)
    raise AssertionError("the queue was not done in time")


@pytest.mark.parametrize("how", ["loop", "recv"])
@pytest.mark.parametrize("kind", ["transactional", "external"])
def test_a_handler_that_never_returns_stalls_nothing(
    spawn: Spawn, db: Conn, clean_db: str, kind: str, how: str
) -> None:
    enqueued_at = one(db, "SELECT clock_timestamp()")
    enqueue_many(
        db, "q_probe", [job(f"j{i:02d}", **({"hang": how} if f"j{i:02d}" == HUNG else {})) for i in range(20)]
    )
    workers = _run_with_restarts(spawn, db, kind, timeout_s=150)

    # The 19 others: once each, in time.
    others = {f"j{i:02d}": 1 for i in range(20) if f"j{i:02d}" != HUNG}
    done = effects_per_key(db, kind)
    assert {k: n for k, n in done.items() if k != HUNG} == others
    last = one(
        db,
        "SELECT extract(epoch FROM max(completed_at) - %s)::float8 FROM workers.processed_jobs"
        " WHERE status = 'completed' AND job_key <> %s",
        enqueued_at,
        HUNG,
    )
    assert last <= DEADLINE_S + VISIBILITY_S + 10, (
        f"the last of the others completed {last:.1f} s after enqueue"
    )

    # The hung job: dead-lettered JobTimedOut after its attempts, its effects never committed.
    letter = _dead_letter(db)
    assert letter is not None and letter["job_key"] == HUNG
    assert letter["error_type"] == "JobTimedOut" and letter["attempts"] == MAX_ATTEMPTS
    assert "probe.py" in letter["error"] and "in _hang" in letter["error"]
    assert one(db, "SELECT status FROM workers.processed_jobs WHERE job_key = %s", HUNG) == "dead"
    if kind == "transactional":
        assert HUNG not in done

    timed_out = [e for w in workers for e in w.named("JOB_TIMED_OUT")]
    assert timed_out and all(e["deadline_s"] == DEADLINE_S for e in timed_out)
    assert all(any("tests/workers/probe.py:" in f and "in _hang" in f for f in e["stack"]) for e in timed_out)
    assert {e["interrupted"] for e in timed_out} == {how == "loop"}
    if how == "recv":  # each hung attempt ended its process, the crash naming the job
        crashes = [e for w in workers for e in w.named("WORKER_CRASH")]
        assert crashes and all(HUNG in e["job_keys"] and e["error_type"] == "JobTimedOut" for e in crashes)
    else:
        assert len(workers) == 1  # interrupted: the same process went on

    _code, report = inspector(clean_db)
    [group] = [g for g in report["dead_letters"]["queues"] if g["queue_name"] == "q_probe"]
    assert dict(group["error_types"]) == {"JobTimedOut": 1}


@pytest.mark.parametrize("kind", ["transactional", "external"])
def test_a_handler_that_calls_sys_exit_fails_its_job_not_the_worker(
    spawn: Spawn, db: Conn, kind: str
) -> None:
    worker = spawn(PROBE_KIND=kind, WORKER_MAX_ATTEMPTS=2, WORKER_RETRY_BASE_S=0)
    worker.wait_boot()
    enqueue_many(db, "q_probe", [job("quitter", sys_exit=1), job("fine")])
    wait_until(lambda: _dead_letter(db) is not None and depth(db) == 0, timeout=30)
    letter = _dead_letter(db)
    assert letter is not None and (letter["job_key"], letter["error_type"]) == ("quitter", "SystemExit")
    assert letter["attempts"] == 2
    assert effects_per_key(db, kind).get("fine") == 1
    failed = worker.wait_for("JOB_FAILED", lambda d: d["job_key"] == "quitter")
    assert failed["error_type"] == "SystemExit"
    assert worker.proc.poll() is None, "the worker exited"
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0


@pytest.mark.parametrize("kind", ["transactional", "external"])
def test_a_crash_in_a_handler_names_its_job(spawn: Spawn, db: Conn, kind: str) -> None:
    worker = spawn(PROBE_KIND=kind)
    worker.wait_boot()
    enqueue_many(db, "q_probe", [job("greedy", memory_error=True)])
    assert worker.wait_exit() == 1
    crash = worker.wait_for("WORKER_CRASH")
    assert crash["error_type"] == "MemoryError" and "greedy" in crash["job_keys"]


def test_the_inspector_shows_a_long_job_in_hand_and_where_it_waits(
    spawn: Spawn, db: Conn, clean_db: str
) -> None:
    """Deadline 60 s, 15 s into a hung job: the inspector (JSON and text) shows the job in
    hand, its age and the frame where it waits."""
    worker = spawn(
        PROBE_KIND="external",
        WORKER_JOB_TIMEOUT_S=60,
        WORKER_HEARTBEAT_INTERVAL_S=1,
        WORKER_DRAIN_TIMEOUT_S=1,
    )
    worker.wait_boot()
    enqueue_many(db, "q_probe", [job("slowpoke", hang="loop")])
    worker.wait_for("PROBE_HANGING")
    time.sleep(15)
    _code, report = inspector(clean_db)
    [mine] = [w for w in report["workers"] if w["worker_id"] == worker.named("WORKER_BOOT")[0]["worker_id"]]
    in_hand = mine["job"]
    assert in_hand["key"] == "slowpoke" and 13 <= in_hand["age_s"] <= 20
    assert "tests/workers/probe.py" in in_hand["stack"][-1] and "in _hang" in in_hand["stack"][-1]
    text = subprocess.run(
        [sys.executable, "-m", "tools.worker_inspector"],
        cwd=ROOT,
        env=worker_env(clean_db),
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "slowpoke" in text and in_hand["stack"][-1] in text
    assert PASSWORD not in text
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(timeout=40) in (0, 143)


def test_hung_jobs_arriving_in_two_reads_are_each_isolated(spawn: Spawn, db: Conn) -> None:
    """A hung job in a new batch, while one from an earlier batch waits to run alone: the
    new batch's record must not erase the earlier job's mark, or the two batches take
    turns being interrupted and nothing is ever counted."""
    worker = spawn(
        WORKER_JOB_TIMEOUT_S=2, WORKER_VISIBILITY_TIMEOUT_S=5, WORKER_MAX_ATTEMPTS=2, WORKER_RETRY_BASE_S=0
    )
    worker.wait_boot()
    enqueue_many(db, "q_probe", [job(f"a{i}", **({"hang": "loop"} if i == 0 else {})) for i in range(6)])
    worker.wait_for("PROBE_HANGING")
    enqueue_many(db, "q_probe", [job(f"b{i}", **({"hang": "loop"} if i == 0 else {})) for i in range(6)])
    wait_until(lambda: depth(db) == 0, timeout=60, interval=0.2)
    letters = {r["job_key"]: r["error_type"] for r in db.execute("SELECT * FROM workers.dead_letters")}
    assert letters == {"a0": "JobTimedOut", "b0": "JobTimedOut"}
    done = effects_per_key(db, "transactional")
    assert done == {f"{p}{i}": 1 for p in "ab" for i in range(1, 6)}


def test_a_claim_stuck_in_c_past_the_visibility_timeout_stays_its_workers(spawn: Spawn, db: Conn) -> None:
    """Deadline plus grace longer than the visibility timeout, two replicas: the server ends
    the stuck job's transaction first, yet its claim stays with its worker (its lease is
    extended) until the deadline records the attempt, so it ends JobTimedOut."""
    env = {
        "WORKER_JOB_TIMEOUT_S": 4,
        "WORKER_VISIBILITY_TIMEOUT_S": 3,
        "WORKER_MAX_ATTEMPTS": 2,
        "WORKER_RETRY_BASE_S": 0,
    }
    workers = [spawn(**env) for _ in range(2)]
    for w in workers:
        w.wait_boot()
    enqueue_many(db, "q_probe", [job("stuck", hang="recv")])
    until = time.monotonic() + 90
    while _dead_letter(db) is None and time.monotonic() < until:
        for n, w in enumerate(workers):
            if w.proc.poll() is not None:
                assert w.wait_exit() == 1
                workers[n] = spawn(**env)
                workers[n].wait_boot()
        time.sleep(0.2)
    letter = _dead_letter(db)
    assert letter is not None and (letter["job_key"], letter["error_type"]) == ("stuck", "JobTimedOut")
