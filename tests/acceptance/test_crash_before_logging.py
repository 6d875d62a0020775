"""A worker that fails before logging starts (a missing dependency, an import error in its
module) still ends with one JSON WORKER_CRASH line and exit 1, the password redacted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from backend.db.embedded import PROJECT_ROOT
from backend.events import undeclared


def test_a_missing_dependency_is_one_json_crash_line(tmp_path: Path) -> None:
    staged = tmp_path / "psycopg"
    staged.mkdir()
    (staged / "__init__.py").write_text('raise ImportError("No module named psycopg (staged)")\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_"))}
    env.update(
        {
            "PYTHONPATH": str(tmp_path),
            "SUPABASE_MODE": "prod",
            "SUPABASE_DB_URL": "postgresql://postgres:Zz9-Never-Print-Me@db.example.com:5432/postgres",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "backend.workers.escalation"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    crash = json.loads(lines[0])
    assert crash["event"] == "WORKER_CRASH" and crash["level"] == "ERROR"
    data = crash["data"]
    assert data["worker_name"] == "q_escalation" and data["exit_code"] == 1
    assert data["error_type"] == "ImportError" and "psycopg" in data["error"]
    assert "escalation.py" in data["traceback"]
    assert undeclared("WORKER_CRASH", data) == []
    assert "Never-Print" not in done.stdout
