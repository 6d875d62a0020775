"""A configuration crash loop, staged for real: three boots of a worker with a bad tunable
each leave a CRASHED heartbeat row, and the inspector calls it a crash loop with the error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psycopg

from backend.db.embedded import PROJECT_ROOT
from scripts.harness.process import WorkerProcess, with_password
from tests.helpers import PASSWORD

Spawn = Callable[..., WorkerProcess]


def test_a_configuration_crash_loop_is_unhealthy_with_its_error(
    spawn: Spawn, db: psycopg.Connection[Any], clean_db: str
) -> None:
    for _ in range(3):
        worker = spawn("backend.workers.collectability", WORKER_BATCH_SIZE="abc")
        assert worker.wait_exit() == 1
    rows = db.execute(
        "SELECT status, metadata FROM workers.heartbeats WHERE queue_name = 'q_collectability'"
    ).fetchall()
    assert [r["status"] for r in rows] == ["CRASHED"] * 3
    assert all(r["metadata"]["variable"] == "WORKER_BATCH_SIZE" for r in rows)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_"))}
    env.update({"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": with_password(clean_db, PASSWORD)})
    done = subprocess.run(
        [sys.executable, "-m", "tools.worker_inspector", "--json"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    loop = [f for f in json.loads(done.stdout)["reasons"] if f["code"] == "crash_loop"]
    assert len(loop) == 1 and loop[0]["subject"] == "q_collectability"
    assert "ConfigError: WORKER_BATCH_SIZE: 'abc' is not a whole number" in loop[0]["message"]
