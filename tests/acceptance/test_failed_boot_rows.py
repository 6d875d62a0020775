"""Every failed boot leaves a CRASHED heartbeat row, so that the inspector shows a loop of
them: a crash before logging (an import error in a worker module), and a failed boot in dev
mode on the embedded default server (no SUPABASE_DB_URL)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backend.db.embedded import EmbeddedPostgres
from scripts.harness.process import WorkerProcess

pytestmark = pytest.mark.timeout(60)


def _crashed(db: psycopg.Connection[Any], queue: str) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT status, stopped_at, metadata FROM workers.heartbeats WHERE queue_name = %s", (queue,)
    ).fetchall()


def test_an_import_error_leaves_a_crashed_row(
    spawn: Callable[..., WorkerProcess], db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    staged = tmp_path / "psycopg_pool"
    staged.mkdir()
    (staged / "__init__.py").write_text('raise ImportError("No module named psycopg_pool (staged)")\n')
    worker = spawn("backend.workers.escalation", PYTHONPATH=str(tmp_path))
    assert worker.wait_exit(timeout=30) == 1
    crash = worker.named("WORKER_CRASH")[0]
    [row] = _crashed(db, "q_escalation")
    assert row["status"] == "CRASHED" and row["stopped_at"] is not None
    assert row["metadata"]["error_type"] == "ImportError" and "psycopg_pool" in row["metadata"]["error"]
    assert row["metadata"]["state_before"] == "BOOTING"
    assert crash["worker_id"]  # the line and the row name the same instance
    assert db.execute(
        "SELECT 1 FROM workers.heartbeats WHERE worker_id = %s", (crash["worker_id"],)
    ).fetchone()


@pytest.fixture
def dev_default(pg_server: EmbeddedPostgres, clean_db: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a worker in dev mode without SUPABASE_DB_URL, whose embedded
    default server is the test server (its data folder, linked)."""
    (tmp_path / "pgdata").symlink_to(pg_server.pgdata)
    return {"DRAGONFLY_DATA_DIR": str(tmp_path)}


@pytest.mark.parametrize(
    ("module", "queue", "env", "error_type"),
    [
        ("tests.workers.probe", "q_probe", {"WORKER_BATCH_SIZE": "abc"}, "ConfigError"),
        (
            "backend.workers.outbox_processor",
            "q_outbox_processor",
            {"OUTBOX_SMTP_HOST": "smtp.invalid"},
            None,
        ),
    ],
    ids=["configuration", "worker-setup"],
)
def test_a_failed_boot_on_the_embedded_default_leaves_a_crashed_row(
    spawn: Callable[..., WorkerProcess],
    db: psycopg.Connection[Any],
    dev_default: dict[str, str],
    module: str,
    queue: str,
    env: dict[str, str],
    error_type: str | None,
) -> None:
    worker = spawn(module, db_url=None, **dev_default, **env)
    assert worker.wait_exit(timeout=30) == 1
    crash = worker.named("WORKER_CRASH")[0]
    [row] = _crashed(db, queue)
    assert row["status"] == "CRASHED"
    assert row["metadata"]["error_type"] == (error_type or crash["error_type"])
    assert row["metadata"]["state_before"] == "BOOTING"
