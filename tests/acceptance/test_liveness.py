"""Liveness with real worker processes: no job, message or frozen worker stalls a queue.

Each failure is staged for real: a handler that ends its process with ``os._exit``, messages
that break the decoder or the memory, SIGSTOP, a network cut (a local proxy that stops
passing bytes), and a frozen worker holding a key that a healthy replica meets.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backend.enqueue import enqueue, enqueue_many
from scripts.harness.process import ROOT, WorkerProcess
from tests.helpers import PASSWORD, job, one, wait_until, worker_env
from tests.netcut import CuttableProxy

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
Conn = psycopg.Connection[Any]
KINDS = ["transactional", "external"]


def depth(db: Conn) -> int:
    return int(one(db, "SELECT count(*) FROM pgmq.q_q_probe"))


def effects_per_key(db: Conn, kind: str) -> dict[str, int]:
    if kind == "transactional":
        rows = db.execute("SELECT job_key, count(*) AS n FROM probe.effects GROUP BY job_key")
    else:
        rows = db.execute("SELECT job_key, calls AS n FROM probe.receiver")
    return {r["job_key"]: r["n"] for r in rows}


def inspector(url: str, *args: str) -> tuple[int, Any]:
    """Run the inspector as an operator would; its exit code and JSON document."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.worker_inspector", *args, "--json"],
        cwd=ROOT,
        env=worker_env(url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert PASSWORD not in done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def letter_kinds(url: str) -> dict[str, int]:
    """What the inspector's verdict says of q_probe's dead letters."""
    code, report = inspector(url)
    assert code == 1 and report["verdict"] == "unhealthy"
    [group] = [g for g in report["dead_letters"]["queues"] if g["queue_name"] == "q_probe"]
    return dict(group["error_types"])


def completed(db: Conn) -> int:
    return int(one(db, "SELECT count(*) FROM workers.processed_jobs WHERE status = 'completed'"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_job_that_kills_its_worker_is_isolated_and_dead_lettered(
    spawn: Spawn, db: Conn, clean_db: str, kind: str
) -> None:
    """1 killer among 20 jobs, the worker restarted after every exit as Railway would: the
    killer runs at most max_attempts + 1 times, the 19 others complete exactly once."""
    max_attempts = 3
    envelopes = [job(f"j{i:02d}", **({"exit_code": 137} if i == 6 else {})) for i in range(20)]
    enqueue_many(db, "q_probe", envelopes)
    runs = 0
    while depth(db) > 0:
        runs += 1
        assert runs <= 12, "the queue is still stalled after 12 restarts"
        worker = spawn(PROBE_KIND=kind, WORKER_VISIBILITY_TIMEOUT_S=1, WORKER_MAX_ATTEMPTS=max_attempts)
        worker.wait_for("WORKER_BOOT")
        wait_until(lambda w=worker: w.proc.poll() is not None or depth(db) == 0, timeout=30)
        if worker.proc.poll() is None:
            worker.send(signal.SIGTERM)
            assert worker.wait_exit() == 0
        else:
            assert worker.wait_exit() == 137

    killer_runs = one(db, "SELECT count(*) FROM probe.attempts WHERE job_key = 'j06'")
    assert 1 <= killer_runs <= max_attempts + 1
    letter = db.execute("SELECT * FROM workers.dead_letters").fetchall()
    assert [(r["job_key"], r["error_type"]) for r in letter] == [("j06", "AttemptsExhausted")]
    assert "ended with its worker gone" in letter[0]["error"]
    assert letter[0]["message"] == envelopes[6]
    assert one(db, "SELECT status FROM workers.processed_jobs WHERE job_key = 'j06'") == "dead"
    done = effects_per_key(db, kind)
    assert {k: n for k, n in done.items() if k != "j06"} == {f"j{i:02d}": 1 for i in range(20) if i != 6}
    assert completed(db) == 19
    assert letter_kinds(clean_db) == {"AttemptsExhausted": 1}


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} missing for {pid}")


@pytest.mark.parametrize("kind", KINDS)
def test_poison_messages_are_dead_lettered_without_touching_memory(
    spawn: Spawn, db: Conn, clean_db: str, kind: str
) -> None:
    worker = spawn(PROBE_KIND=kind)
    worker.wait_for("WORKER_BOOT")
    enqueue_many(db, "q_probe", [job(f"warm{i}") for i in range(20)])
    wait_until(lambda: depth(db) == 0)
    idle_kb = _rss_kb(worker.pid, "VmRSS")
    Path(f"/proc/{worker.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)

    head = {"idempotency_key": "x", "entity_type": "probe", "entity_id": "1", "org_id": "o"}
    nested = "[" * 5000 + "]" * 5000
    huge_number = (
        '{"idempotency_key": "num", "entity_type": "probe", "entity_id": "1",'
        ' "org_id": "o", "payload": {"n": ' + "7" * 5000 + "}}"
    )
    db.execute("SELECT pgmq.send('q_probe', %s::jsonb)", (nested,))
    db.execute("SELECT pgmq.send('q_probe', %s::jsonb)", (huge_number,))
    for key, mb in (("six-mb", 6), ("fifty-mb", 50)):
        db.execute(
            "SELECT pgmq.send('q_probe', %s::jsonb || jsonb_build_object('idempotency_key', %s::text,"
            " 'payload', jsonb_build_object('blob', repeat('x', %s))))",
            (psycopg.types.json.Jsonb(head), key, mb * 1024 * 1024),
        )
    enqueue_many(db, "q_probe", [job(f"after{i}") for i in range(20)])
    wait_until(lambda: depth(db) == 0, timeout=60)
    peak_kb = _rss_kb(worker.pid, "VmHWM")

    # (the letters' bodies stay in SQL: the nested one is beyond Python's decoder too)
    letters = {
        r["error_type"]: r
        for r in db.execute("SELECT error_type, error FROM workers.dead_letters ORDER BY id")
    }
    kinds = [r["error_type"] for r in db.execute("SELECT error_type FROM workers.dead_letters ORDER BY id")]
    assert kinds == ["UndecodableMessage", "UndecodableMessage", "PayloadTooLarge", "PayloadTooLarge"]
    assert (
        "RecursionError" in letters["UndecodableMessage"]["error"]
        or "ValueError" in letters["UndecodableMessage"]["error"]
    )
    sizes = [
        r["n"]
        for r in db.execute(
            "SELECT octet_length(message::text) AS n FROM workers.dead_letters"
            " WHERE error_type = 'PayloadTooLarge' ORDER BY id"
        )
    ]
    assert sizes[0] > 6 * 1024 * 1024 and sizes[1] > 50 * 1024 * 1024, "the full body is kept"
    assert "bytes, over WORKER_MAX_PAYLOAD_BYTES" in letters["PayloadTooLarge"]["error"]
    assert all(n == 1 for k, n in effects_per_key(db, kind).items() if k.startswith("after"))
    assert sum(1 for k in effects_per_key(db, kind) if k.startswith("after")) == 20
    events = [e["error_type"] for e in worker.named("JOB_DEAD_LETTERED")]
    assert events.count("PayloadTooLarge") == 2 and events.count("UndecodableMessage") == 2
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0
    assert peak_kb - idle_kb <= 20 * 1024, f"peak RSS {peak_kb} kB, idle {idle_kb} kB"
    assert letter_kinds(clean_db) == {"PayloadTooLarge": 2, "UndecodableMessage": 2}
    code, listing = inspector(clean_db, "dead-letters", "list")
    assert code == 0 and listing["count"] == 4
    nested_text = [i["message"] for i in listing["items"] if i["message"] and str(i["message"])[:2] == "[["]
    assert len(nested_text) == 1 and nested_text[0].startswith("[[[")  # shown as its text


@pytest.fixture
def proxy(clean_db: str) -> Iterator[CuttableProxy]:
    p = CuttableProxy(clean_db)
    yield p
    p.close()


def _freeze_mid_batch(db: Conn, spawn: Spawn, extra: dict[str, Any]) -> tuple[WorkerProcess, list[str]]:
    """Worker A takes a batch of 20 and is inside the handler of its first job."""
    keys = [f"b{i:02d}" for i in range(20)]
    enqueue_many(db, "q_probe", [job(keys[0], sleep_s=2), *(job(k) for k in keys[1:])])
    a = spawn(WORKER_VISIBILITY_TIMEOUT_S=3, **extra)
    a.wait_for("PROBE_IN_HANDLER")
    return a, keys


def _sessions_in_transaction(db: Conn, worker: WorkerProcess) -> int:
    worker_id = worker.wait_for("WORKER_BOOT")["worker_id"]
    return int(
        one(
            db,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state LIKE 'idle in transaction%%'",
            worker_id,
        )
    )


def test_a_frozen_workers_batch_moves_to_another_within_ten_seconds(spawn: Spawn, db: Conn) -> None:
    a, keys = _freeze_mid_batch(db, spawn, {})
    a.send(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        b = spawn(WORKER_VISIBILITY_TIMEOUT_S=3)
        wait_until(lambda: completed(db) == 20, timeout=10)
        moved_s = time.monotonic() - frozen_at
    finally:
        a.send(signal.SIGCONT)
    # A wakes up to a transaction the server ended: it says so, and goes on.
    lost = a.wait_for("TRANSACTION_TIMED_OUT", timeout=15)
    assert lost["limit_s"] == 3 and "WORKER_VISIBILITY_TIMEOUT_S" in lost["fix"]
    assert a.wait_for("WORKER_STALLED")["stalled_s"] >= moved_s * 0.9
    enqueue(db, "q_probe", job("after-thaw"))
    wait_until(lambda: completed(db) == 21)
    for w in (a, b):
        w.send(signal.SIGTERM)
        assert w.wait_exit() == 0
    assert effects_per_key(db, "transactional") == {k: 1 for k in [*keys, "after-thaw"]}
    assert moved_s < 10


def test_a_cut_off_workers_batch_moves_to_another(spawn: Spawn, db: Conn, proxy: CuttableProxy) -> None:
    a, keys = _freeze_mid_batch(db, spawn, {"SUPABASE_DB_URL": proxy.url(PASSWORD)})
    proxy.cut()
    cut_at = time.monotonic()
    try:
        b = spawn(WORKER_VISIBILITY_TIMEOUT_S=3)
        wait_until(lambda: completed(db) == 20, timeout=10)
        moved_s = time.monotonic() - cut_at
        # The server ended A's transaction on its own: no backend of A is left in one.
        assert _sessions_in_transaction(db, a) == 0
    finally:
        proxy.heal()
    enqueue(db, "q_probe", job("after-heal"))
    wait_until(lambda: completed(db) == 21, timeout=30)
    for w in (a, b):
        w.send(signal.SIGTERM)
        assert w.wait_exit() == 0
    assert effects_per_key(db, "transactional") == {k: 1 for k in [*keys, "after-heal"]}
    assert moved_s < 10


def test_a_healthy_replica_goes_on_while_a_frozen_one_holds_a_key_it_meets(spawn: Spawn, db: Conn) -> None:
    enqueue(db, "q_probe", job("shared", sleep_s=1))
    a = spawn()  # the default lease: A's transaction would hold the key for 30 s
    a.wait_for("PROBE_IN_HANDLER")
    a.send(signal.SIGSTOP)
    try:
        enqueue(db, "q_probe", job("shared"))  # a copy of the key A holds
        enqueue_many(db, "q_probe", [job(f"fresh{i}") for i in range(50)])
        b = spawn()
        started = time.monotonic()
        wait_until(lambda: completed(db) == 50, timeout=15)
        took_s = time.monotonic() - started
        assert one(db, "SELECT count(*) FROM probe.effects WHERE job_key = 'shared'") == 0
        waiting = [
            r["wait_event_type"]
            for r in db.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE application_name LIKE 'probe-%%'"
                " AND state = 'active'"
            )
        ]
        assert "Lock" not in waiting, "a healthy replica waits on the frozen one's lock"
    finally:
        a.send(signal.SIGKILL)
        a.wait_exit()
    wait_until(lambda: completed(db) == 51, timeout=40)
    b.send(signal.SIGTERM)
    assert b.wait_exit() == 0
    assert effects_per_key(db, "transactional") == {"shared": 1, **{f"fresh{i}": 1 for i in range(50)}}
    assert took_s < 15


def test_a_transactional_job_longer_than_its_lease_yet_busy_completes_once(spawn: Spawn, db: Conn) -> None:
    """A transaction that keeps talking to the server is never ended, however long it runs,
    and a replica that meets its key waits for it instead of running it again."""
    workers = [spawn(WORKER_VISIBILITY_TIMEOUT_S=1) for _ in range(2)]
    for w in workers:
        w.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("long", busy_s=3.5))
    wait_until(lambda: completed(db) == 1, timeout=30)
    for w in workers:
        w.send(signal.SIGTERM)
        assert w.wait_exit() == 0
    assert one(db, "SELECT count(*) FROM probe.attempts WHERE job_key = 'long'") == 1
    assert one(db, "SELECT count(*) FROM probe.effects WHERE job_key = 'long'") == 1


def test_a_transactional_job_idle_past_its_lease_never_loops(spawn: Spawn, db: Conn) -> None:
    """A handler that pauses longer than the visibility timeout inside its transaction is
    ended by the server each time, counted, and dead-lettered after max_attempts."""
    worker = spawn(WORKER_VISIBILITY_TIMEOUT_S=1, WORKER_MAX_ATTEMPTS=2)
    worker.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("dawdler", sleep_s=2))
    enqueue(db, "q_probe", job("brisk"))
    wait_until(
        lambda: one(db, "SELECT status FROM workers.processed_jobs WHERE job_key = 'dawdler'") == "dead",
        timeout=40,
    )
    assert worker.named("TRANSACTION_TIMED_OUT")
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0
    letter = "SELECT error_type FROM workers.dead_letters WHERE job_key = 'dawdler'"
    assert one(db, letter) == "AttemptsExhausted"
    assert one(db, "SELECT count(*) FROM probe.effects WHERE job_key = 'dawdler'") == 0
    assert one(db, "SELECT count(*) FROM probe.effects WHERE job_key = 'brisk'") == 1
    assert one(db, "SELECT count(*) FROM probe.attempts WHERE job_key = 'dawdler'") <= 3


def test_a_second_sigterm_under_a_network_cut_ends_the_worker_within_a_second(
    spawn: Spawn, db: Conn, proxy: CuttableProxy
) -> None:
    enqueue(db, "q_probe", job("cut-off", sleep_s=30))
    a = spawn(SUPABASE_DB_URL=proxy.url(PASSWORD))
    a.wait_for("PROBE_IN_HANDLER")
    proxy.cut()
    a.send(signal.SIGTERM)
    # Said at once, though the state's heartbeat write hangs on the cut network.
    a.wait_for("WORKER_DRAINING", timeout=1)
    a.send(signal.SIGTERM)
    second_at = time.monotonic()
    assert a.wait_exit(timeout=10) == 143
    took_s = time.monotonic() - second_at
    assert took_s < 1.0, took_s
    assert a.wait_for("WORKER_SHUTDOWN")["abandoned"].startswith("second signal")


def _run_alone_with_a_sleeper(db: Conn, kind: str) -> None:
    """One job that sleeps 2 s in its handler. On a transactional queue it is made to run
    alone (a delivery record says an earlier batch never finished it): a leased claim, like
    every external job, and not the row lock of a batch, which ends with its worker anyway."""
    msg_id = enqueue(db, "q_probe", job("slow", sleep_s=2))
    if kind == "transactional":
        db.execute(
            "INSERT INTO workers.deliveries (worker_id, queue_name, msg_ids) VALUES ('gone', 'q_probe', %s)",
            ([msg_id],),
        )


@pytest.mark.parametrize("kind", KINDS)
def test_a_job_whose_worker_was_killed_in_its_handler_runs_again_at_once(
    spawn: Spawn, db: Conn, clean_db: str, kind: str
) -> None:
    """Its lease would hold it for 30 s: a worker whose process is gone has no session left,
    so a replica gives its claim back at once and runs it again, the attempt counted."""
    _run_alone_with_a_sleeper(db, kind)
    a = spawn(PROBE_KIND=kind)
    owner = a.wait_for("WORKER_BOOT")["worker_id"]
    a.wait_for("PROBE_IN_HANDLER")
    b = spawn(PROBE_KIND=kind)
    b.wait_for("WORKER_BOOT")
    a.send(signal.SIGKILL)
    killed_at = time.monotonic()
    assert a.wait_exit() == -signal.SIGKILL
    rescued = b.wait_for("JOB_RESCUED", timeout=10)
    assert (rescued["job_key"], rescued["owner"]) == ("slow", owner)
    wait_until(lambda: completed(db) == 1, timeout=10)
    took_s = time.monotonic() - killed_at
    b.send(signal.SIGTERM)
    assert b.wait_exit() == 0
    attempts = db.execute("SELECT attempt FROM probe.attempts WHERE job_key = 'slow' ORDER BY id")
    assert [r["attempt"] for r in attempts] == [1, 2]
    assert took_s < 10, f"moved after {took_s:.1f} s; its lease was 30 s"
    _, report = inspector(clean_db)
    [dead] = [w for w in report["workers"] if w["worker_id"] == owner]
    assert dead["verdict"] == "dead"


def test_a_frozen_workers_claim_is_not_given_back_before_its_lease_ends(spawn: Spawn, db: Conn) -> None:
    """A frozen worker keeps its sessions: it may wake up and finish, so its lease stands."""
    _run_alone_with_a_sleeper(db, "external")
    a = spawn(PROBE_KIND="external")
    a.wait_for("PROBE_IN_HANDLER")
    a.send(signal.SIGSTOP)
    try:
        b = spawn(PROBE_KIND="external")
        b.wait_for("WORKER_BOOT")
        time.sleep(4)  # four idle checks of B
        assert b.named("JOB_RESCUED") == []
        assert completed(db) == 0
    finally:
        a.send(signal.SIGCONT)
    wait_until(lambda: completed(db) == 1, timeout=10)
    for w in (a, b):
        w.send(signal.SIGTERM)
        assert w.wait_exit() == 0
    assert [r["attempt"] for r in db.execute("SELECT attempt FROM probe.attempts")] == [1]
