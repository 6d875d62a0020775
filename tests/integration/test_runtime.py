"""The runtime in-process: started through ``Runtime``, stopped with ``stop()``, with no
signal handler installed (the entry point installs them, not the runtime)."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import psycopg

from backend.config import load_settings
from backend.enqueue import build_envelope, enqueue
from backend.workers.lifecycle import State
from backend.workers.runtime import EXIT_OK, Runtime
from tests.workers.probe import ProbeTransactional


def _wait(condition: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_runtime_runs_in_process_and_stop_drains_it(db: psycopg.Connection[Any], clean_db: str) -> None:
    handlers_before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    settings = load_settings(
        {"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": clean_db, "WORKER_HEARTBEAT_INTERVAL_S": "0.2"}
    )
    runtime = Runtime(ProbeTransactional(settings))
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(runtime.run()), daemon=True)
    thread.start()
    _wait(lambda: runtime.lifecycle.state is State.RUNNING)
    for i in range(3):
        envelope = build_envelope(
            entity_type="probe", entity_id=str(i), org_id="o", idempotency_key=f"inproc-{i}", payload={}
        )
        enqueue(db, "q_probe", envelope)
    _wait(lambda: runtime.counters.processed == 3)

    runtime.stop("test")
    thread.join(15)

    assert not thread.is_alive() and codes == [EXIT_OK]
    assert runtime.lifecycle.state is State.STOPPED
    row = db.execute(
        "SELECT status FROM workers.heartbeats WHERE worker_id = %s", (runtime.worker_id,)
    ).fetchone()
    assert row is not None and row["status"] == "STOPPED"
    assert db.execute("SELECT count(*) AS n FROM probe.effects").fetchone()["n"] == 3
    assert {sig: signal.getsignal(sig) for sig in handlers_before} == handlers_before
    assert signal.set_wakeup_fd(-1) == -1, "the runtime set a signal wakeup fd"
