"""``worker_inspector watch`` at a pseudo-terminal, read back through a terminal emulator:
the screen shows the queues and workers, changes when a job is enqueued, and q quits."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pyte
import pytest

from backend.db.embedded import PROJECT_ROOT
from backend.enqueue import build_envelope, enqueue
from scripts.harness.process import WorkerProcess

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]


class Terminal:
    """The inspector on a 120x40 pseudo-terminal, its screen kept by pyte."""

    def __init__(self, url: str) -> None:
        self.screen = pyte.Screen(120, 40)
        self.stream = pyte.ByteStream(self.screen)
        leader, follower = pty.openpty()
        os.set_blocking(leader, False)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_"))}
        env.update(
            {"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": url, "TERM": "xterm", "LINES": "40", "COLUMNS": "120"}
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.worker_inspector", "watch", "--every", "0.5"],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=follower,
            stdout=follower,
            stderr=follower,
            start_new_session=True,
        )
        os.close(follower)
        self.leader = leader

    def pump(self) -> None:
        while select.select([self.leader], [], [], 0.05)[0]:
            try:
                chunk = os.read(self.leader, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.stream.feed(chunk)

    def wait_for(self, check: Callable[[list[str]], bool], timeout: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            lines = list(self.screen.display)
            if check(lines):
                return lines
            time.sleep(0.05)
        raise AssertionError("screen never showed it:\n" + "\n".join(self.screen.display))

    def press(self, key: bytes) -> None:
        os.write(self.leader, key)


def row(lines: list[str], start: str) -> list[str]:
    return next((line.split() for line in lines if line.startswith(start)), [])


def test_watch_shows_queues_and_workers_changes_with_a_job_and_quits_on_q(
    spawn: Spawn, clean_db: str, db: psycopg.Connection[Any]
) -> None:
    worker = spawn("backend.workers.escalation")
    worker_id = worker.wait_boot()["worker_id"]
    term = Terminal(clean_db)
    try:
        lines = term.wait_for(lambda ls: any(worker_id in line and "alive" in line for line in ls))
        assert lines[0].startswith("worker inspector watch")
        assert row(lines, "q_collectability")[1] == "0"  # depth
        enqueue(
            db,
            "q_collectability",
            build_envelope(entity_type="judgment", entity_id="1", org_id="o", idempotency_key="watch-1"),
        )
        term.wait_for(lambda ls: row(ls, "q_collectability")[1:2] == ["1"])
        term.press(b"q")
        assert term.proc.wait(timeout=10) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.leader)


def test_through_a_pipe_it_repeats_the_plain_report(clean_db: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_"))}
    env.update({"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": clean_db})
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.worker_inspector", "watch", "--every", "0.3"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("worker inspector: ")
        if seen == 2:
            break
    proc.terminate()
    proc.wait(timeout=10)
    proc.stdout.close()
    assert seen == 2
