"""python -m backend.enqueue --file: 10,000 lines, two of them bad: the good ones sent in
batches, the bad ones reported by line number and not sent, a progress bar at a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backend.db.embedded import PROJECT_ROOT

pytestmark = pytest.mark.slow


def env_for(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_", "RAILWAY_"))}
    return {**env, "SUPABASE_MODE": "dev", "SUPABASE_DB_URL": url}


def enqueue_file(path: Path, *extra: str) -> list[str]:
    """The command line that sends ``path`` to q_collectability for org-1."""
    return [
        sys.executable,
        "-m",
        "backend.enqueue",
        "q_collectability",
        "--org-id",
        "org-1",
        "--file",
        str(path),
        *extra,
    ]


def jobs_file(path: Path, count: int, bad: dict[int, str]) -> Path:
    lines = []
    for n in range(1, count + 1):
        lines.append(bad.get(n) or json.dumps({"entity_id": str(n), "key": f"file-{n}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_file_of_ten_thousand_jobs_with_two_bad_lines(
    tmp_path: Path, clean_db: str, db: psycopg.Connection[Any]
) -> None:
    bad = {17: '{"entity_id": "17", "key": ', 5000: '{"key": "no-entity"}'}
    path = jobs_file(tmp_path / "jobs.jsonl", 10_000, bad)
    started = time.monotonic()
    done = subprocess.run(
        enqueue_file(path),
        cwd=PROJECT_ROOT,
        env=env_for(clean_db),
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    errors = done.stderr.splitlines()
    assert [e.split(": not sent:")[0] for e in errors] == [f"{path}:17", f"{path}:5000"], errors
    assert "entity_id" in errors[1]
    summary = json.loads(done.stdout)
    assert summary["sent"] == 9_998 and summary["bad_lines"] == [17, 5000]
    rows = db.execute(
        "SELECT count(*) AS n, count(DISTINCT message ->> 'idempotency_key') AS keys,"
        " bool_and(message ->> 'entity_type' = 'judgment' AND message ->> 'org_id' = 'org-1') AS filled"
        " FROM pgmq.q_q_collectability"
    ).fetchone()
    assert rows == {"n": 9_998, "keys": 9_998, "filled": True}
    print(f"enqueue --file: 10,000 lines in {took:.2f} s")


def test_at_a_terminal_it_draws_a_progress_bar(tmp_path: Path, clean_db: str) -> None:
    path = jobs_file(tmp_path / "jobs.jsonl", 2_000, {})
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        enqueue_file(path, "--batch", "250"),
        cwd=PROJECT_ROOT,
        env=env_for(clean_db),
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    out, _ = proc.communicate(timeout=30)
    os.close(leader)
    assert proc.returncode == 0
    text = screen.decode()
    assert text.count("\r[") == 8  # one redraw per batch of 250
    assert "[##############################] 2,000/2,000 jobs" in text
    assert json.loads(out)["sent"] == 2_000


def test_a_failure_halfway_says_how_many_were_sent(
    tmp_path: Path, clean_db: str, db: psycopg.Connection[Any]
) -> None:
    path = jobs_file(tmp_path / "jobs.jsonl", 1_000, {})
    db.execute(
        "CREATE FUNCTION refuse_file_600() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.message ->> 'idempotency_key' = 'file-600' THEN RAISE EXCEPTION 'refused by a trigger';"
        " END IF; RETURN NEW; END $$"
    )
    db.execute(
        "CREATE TRIGGER fail_600 BEFORE INSERT ON pgmq.q_q_collectability"
        " FOR EACH ROW EXECUTE FUNCTION refuse_file_600()"
    )
    try:
        done = subprocess.run(
            enqueue_file(path, "--batch", "250"),
            cwd=PROJECT_ROOT,
            env=env_for(clean_db),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        db.execute("DROP TRIGGER fail_600 ON pgmq.q_q_collectability")
        db.execute("DROP FUNCTION refuse_file_600()")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0] == f"{path}: 500 of 1,000 jobs were sent before the failure below"
    assert lines[1].startswith("enqueue failed:") and "refused by a trigger" in lines[1]
    assert db.execute("SELECT count(*) AS n FROM pgmq.q_q_collectability").fetchone()["n"] == 500
