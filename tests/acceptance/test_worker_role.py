"""The workers' least-privilege role: the full demo runs with the three workers logged in
as a member of ``dragonfly_worker``, and that role can touch nothing else."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scripts.demo import DEMO_LOGIN
from scripts.harness.process import inherited_env, with_password

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_runs_its_three_workers_as_the_least_privilege_role(clean_db: str, db: Any) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--judgments", "20", "--cases", "6", "--worker-role"],
        cwd=ROOT,
        env=inherited_env(SUPABASE_MODE="dev", SUPABASE_DB_URL=clean_db, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"workers run as {DEMO_LOGIN}, a member of dragonfly_worker" in done.stdout
    logs = Path(re.findall(r"(\S+)/collectability\.log", done.stdout)[-1])
    for name in ("collectability", "escalation", "outbox_processor"):
        boots = [
            e
            for e in map(json.loads, (logs / f"{name}.log").read_text().splitlines())
            if e["event"] == "WORKER_BOOT"
        ]
        assert boots and f"//{DEMO_LOGIN}:" in boots[0]["data"]["db_url"]
        assert boots[0]["data"]["db_status"] == "ok"
    statuses = dict(
        (r["status"], r["n"])
        for r in db.execute("SELECT status, count(*) AS n FROM workers.processed_jobs GROUP BY 1")
    )
    # 20 scores, 6 recommendations, 6 of their notifications and the welcome message.
    assert statuses == {"completed": 33}
    assert db.execute("SELECT count(*) AS n FROM dragonfly.collectability_scores").fetchone()["n"] == 20

    password = "role-check-pw"
    db.execute(f"ALTER ROLE {DEMO_LOGIN} PASSWORD '{password}'")
    with psycopg.connect(with_password(clean_db, password, user=DEMO_LOGIN), autocommit=True) as worker:
        assert worker.execute("SELECT current_user").fetchone() == (DEMO_LOGIN,)
        for forbidden in (
            "CREATE TABLE workers.extra (id int)",
            "UPDATE dragonfly.judgments SET amount = 0",
            "DELETE FROM dragonfly.enforcement_cases",
            "SELECT count(*) FROM dragonfly.plaintiffs",
            "DROP TABLE workers.processed_jobs",
            "SELECT pgmq.create('q_rogue')",
            "TRUNCATE pgmq.q_q_collectability",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                worker.execute(forbidden)


def test_migrate_runs_as_the_owner_given_by_its_own_variable(clean_db: str, db: Any) -> None:
    password = "migrate-check-pw"
    db.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{DEMO_LOGIN}')"
        f" THEN CREATE ROLE {DEMO_LOGIN} LOGIN; END IF; END $$"
    )
    db.execute(f"ALTER ROLE {DEMO_LOGIN} PASSWORD '{password}'")
    db.execute(f"GRANT dragonfly_worker TO {DEMO_LOGIN}")
    as_worker = with_password(clean_db, password, user=DEMO_LOGIN)

    def migrate(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "backend.db.migrate"],
            cwd=ROOT,
            env=inherited_env(SUPABASE_MODE="prod", SUPABASE_DB_URL=as_worker, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = migrate()
    assert refused.returncode == 1 and "MIGRATION_FAILED" in refused.stdout + refused.stderr
    assert migrate(SUPABASE_MIGRATION_DB_URL=clean_db).returncode == 0
    bad = migrate(
        SUPABASE_MIGRATION_DB_URL="postgresql://postgres:[Sup3rSecretPw]@db.example.co:5432/postgres"
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("configuration error: SUPABASE_MIGRATION_DB_URL:")
    assert "Sup3rSecretPw" not in bad.stdout + bad.stderr
