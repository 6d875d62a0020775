"""The workers' role on Supabase: row-level security on a queue table (Supabase's linter asks
for it) neither stalls the workers nor goes unexplained, and everything the guide tells an
operator to run with the workers' URL works as a member of ``dragonfly_worker``."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backend.db.install import WORKER_POLICY, WORKER_ROLE, grant_worker_role
from backend.domain.seed import seed_demo
from backend.enqueue import build_envelope, enqueue
from scripts.harness.process import ROOT, WorkerProcess, with_password
from tests.helpers import PASSWORD, one, run_inspector, wait_until

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
Conn = psycopg.Connection[Any]
LOGIN = "dragonfly_rls_login"
TABLE = "pgmq.q_q_collectability"
GUIDE = ROOT / "docs" / "RAILWAY_WORKER_CONFIG.md"


@pytest.fixture
def login_url(db: Conn, clean_db: str) -> Iterator[str]:
    """A login in the workers' role, as the guide's "A role for the workers" makes one; row-level
    security on the queue table is switched off and the role's grants restored afterwards."""
    if not db.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (LOGIN,)).fetchone():
        db.execute(f"CREATE ROLE {LOGIN} LOGIN PASSWORD '{PASSWORD}'")
    db.execute(f"GRANT {WORKER_ROLE} TO {LOGIN}")
    try:
        yield with_password(clean_db, PASSWORD, user=LOGIN)
    finally:
        db.execute(f"ALTER TABLE {TABLE} DISABLE ROW LEVEL SECURITY")
        grant_worker_role(db, ("q_collectability",))


def inspector(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_inspector(url, *args, timeout=60, SUPABASE_MODE="prod")


def three_jobs(db: Conn) -> None:
    seeded = seed_demo(db, judgments=3, cases=0)
    for judgment in seeded["judgment_ids"]:
        enqueue(
            db,
            "q_collectability",
            build_envelope(
                entity_type="judgment",
                entity_id=str(judgment),
                org_id=seeded["org_id"],
                idempotency_key=f"score:{judgment}",
            ),
        )


def count(db: Conn, sql: str) -> int:
    return int(one(db, sql))


def test_the_workers_role_runs_a_queue_whose_table_has_row_level_security(
    spawn: Spawn, db: Conn, login_url: str
) -> None:
    db.execute(f"ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY")
    three_jobs(db)
    worker = spawn("backend.workers.collectability", db_url=login_url, SUPABASE_MODE="prod")
    assert worker.wait_boot()["db_status"] == "ok"
    wait_until(lambda: count(db, "SELECT count(*) AS n FROM dragonfly.collectability_scores") == 3)
    wait_until(lambda: count(db, f"SELECT count(*) AS n FROM {TABLE}") == 0)
    assert count(db, "SELECT count(*) AS n FROM workers.processed_jobs WHERE status = 'completed'") == 3
    done = inspector(login_url, "--json")
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    assert not [r for r in report["reasons"] if r["code"] == "queue_hidden"]


def test_a_queue_hidden_by_row_level_security_is_named_at_boot_and_by_the_inspector(
    spawn: Spawn, db: Conn, clean_db: str, login_url: str
) -> None:
    db.execute(f"ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY")
    db.execute(f"DROP POLICY {WORKER_POLICY} ON {TABLE}")
    three_jobs(db)
    worker = spawn("backend.workers.collectability", db_url=login_url, SUPABASE_MODE="prod")
    boot = worker.wait_for("WORKER_BOOT")
    assert boot["db_status"] == "error" and boot["error_type"] == "BootError"
    assert f"row-level security on {TABLE} hides its rows from role {LOGIN}" in boot["error"]
    assert "python -m backend.db.migrate" in boot["error"]
    assert worker.wait_exit() == 1
    assert count(db, f"SELECT count(*) AS n FROM {TABLE}") == 3

    done = inspector(login_url, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    hidden = [r for r in json.loads(done.stdout)["reasons"] if r["code"] == "queue_hidden"]
    assert [r["subject"] for r in hidden] == ["q_collectability"]
    assert f"row-level security on {TABLE} hides its rows from role {LOGIN}" in hidden[0]["message"]
    # The owner sees the rows: nothing hidden from it.
    owner = json.loads(inspector(clean_db, "--json").stdout)
    assert not [r for r in owner["reasons"] if r["code"] == "queue_hidden"]


# --- what the guide tells an operator to run with the workers' URL ------------------------


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def guide_statements() -> list[str]:
    """The SQL of the Troubleshooting section, which opens by telling the operator to connect
    with the workers' URL: every statement of every ``sql`` block."""
    section = _section(GUIDE.read_text(), "## Troubleshooting")
    assert "Connect with the same URL as the workers" in section
    blocks = re.findall(r"```sql\n(.*?)```", section, re.S)
    return [s.strip() for block in blocks for s in block.split(";\n") if s.strip()]


def guide_inspector_commands() -> list[list[str]]:
    """Every inspector command of the guide (the inspector runs as the workers' role)."""
    found = re.findall(r"`python -m tools\.worker_inspector([^`]*)`", GUIDE.read_text())
    return [shlex.split(args) for args in dict.fromkeys(found)]


def test_everything_the_guide_runs_with_the_workers_url_works_as_the_workers_role(
    db: Conn, login_url: str, tmp_path: Path
) -> None:
    statements = guide_statements()
    commands = guide_inspector_commands()
    # A renamed section or a new fence must not leave this test checking nothing.
    assert len(statements) >= 14 and any("pgmq.metrics" in s for s in statements)
    assert ["dead-letters", "replay", "--id", "12"] in commands and [] in commands
    three_jobs(db)
    db.execute(
        "INSERT INTO workers.dead_letters (id, queue_name, msg_id, job_key, message, error, error_type,"
        " attempts, worker_id) OVERRIDING SYSTEM VALUE VALUES (12, 'q_escalation', 1, 'k-12',"
        " '{\"idempotency_key\": \"k-12\"}', 'boom', 'RuntimeError', 5, 'w')"
    )
    with psycopg.connect(login_url, autocommit=True) as worker:
        assert worker.execute("SELECT current_user").fetchone() == (LOGIN,)
        for statement in statements:
            try:
                worker.execute(statement)
            except psycopg.Error as exc:
                pytest.fail(f"as {LOGIN}: {statement!r} failed: {exc}")
    for args in commands:
        if args[-1:] == ["--html"]:
            args = [*args, str(tmp_path / "report.html")]
        done = inspector(login_url, *args)
        assert done.returncode in (0, 1), f"{args}: {done.stdout}{done.stderr}"
        assert "permission denied" not in done.stdout + done.stderr, args
    assert count(db, "SELECT count(*) AS n FROM workers.dead_letters WHERE replayed_at IS NOT NULL") == 1
    assert count(db, "SELECT count(*) AS n FROM pgmq.q_q_escalation") == 1
