"""Log lines at a terminal: short text under a pseudo-terminal, JSON under a pipe, and
WORKER_LOG_FORMAT forcing either; a configuration error is said once."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

from backend.db.embedded import PROJECT_ROOT
from scripts.harness.process import with_password
from tests.helpers import PASSWORD

MODULE = "backend.workers.collectability"


def _env(db_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_", "RAILWAY_"))}
    env.update({"SUPABASE_MODE": "dev", "PYTHONUNBUFFERED": "1", **extra})
    if db_url:
        env["SUPABASE_DB_URL"] = with_password(db_url, PASSWORD)
    return env


def run_on_a_terminal(env: dict[str, str], *, until: str | None, timeout_s: float = 20.0) -> tuple[int, str]:
    """Run the worker with a pseudo-terminal as stdout; SIGTERM it once ``until`` shows."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", MODULE], cwd=PROJECT_ROOT, env=env, stdout=follower, stderr=follower
    )
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout_s
    signalled = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not chunk:
                break
            out += chunk
        if until and not signalled and until.encode() in out:
            proc.send_signal(signal.SIGTERM)
            signalled = True
        if proc.poll() is not None and not ready:
            break
    code = proc.wait(timeout=10)
    os.close(leader)
    return code, out.decode("utf-8", "replace").replace("\r\n", "\n")


def test_a_worker_at_a_terminal_writes_short_text_lines(clean_db: str) -> None:
    code, out = run_on_a_terminal(_env(clean_db), until="WORKER_BOOT")
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 0, out
    assert not any(line.startswith("{") for line in lines), out
    boot = next(line for line in lines if " WORKER_BOOT " in line)
    assert " INFO " in boot and "db_status=ok" in boot and "queue=q_collectability" in boot
    assert "worker_id=" not in boot and len(boot) < 300
    assert any(" WORKER_SHUTDOWN " in line and "exit_code=0" in line for line in lines)
    assert PASSWORD not in out


def test_json_is_forced_at_a_terminal_and_console_through_a_pipe(clean_db: str) -> None:
    code, out = run_on_a_terminal(_env(clean_db, WORKER_LOG_FORMAT="json"), until="WORKER_BOOT")
    assert code == 0
    assert all(json.loads(line) for line in out.splitlines() if line.strip())
    piped = subprocess.run(
        [sys.executable, "-m", MODULE],
        cwd=PROJECT_ROOT,
        env=_env(clean_db, WORKER_LOG_FORMAT="console", WORKER_BATCH_SIZE="abc"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.returncode == 1
    assert not piped.stdout.startswith("{") and " WORKER_CRASH " in piped.stdout


def test_a_configuration_error_is_said_once_at_a_terminal(clean_db: str) -> None:
    code, out = run_on_a_terminal(_env(clean_db, WORKER_BATCH_SIZE="abc"), until=None)
    assert code == 1, out
    assert out.count("WORKER_BATCH_SIZE: 'abc' is not a whole number") == 1, out
    assert " WORKER_BOOT " in out and " WORKER_CRASH " in out and "Traceback" not in out
