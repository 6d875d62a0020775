"""Migrations as operators meet them, with real processes: a wait for the migrations' lock
says who holds it and gives up after its bound; a dev worker refuses the transaction
pooler before it connects; a release older than an applied contract step refuses to boot
and leaves its queue alone."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from backend.db.embedded import PROJECT_ROOT
from backend.db.migrate import LOCK_KEY, latest_version
from backend.enqueue import enqueue
from scripts.harness.process import WorkerProcess, inherited_env, with_password
from tests.helpers import PASSWORD, job

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
HOLDER_NAME = "deploy-42-migrate"


@pytest.fixture
def lock_holder(clean_db: str) -> Iterator[int]:
    """Another session holding the migrations' lock (a stuck deploy, say): its pid."""
    with psycopg.connect(clean_db, autocommit=True, application_name=HOLDER_NAME) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        row = holder.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        yield int(row[0])


def test_migrate_names_the_lock_holder_and_gives_up_after_its_bound(spawn: Spawn, lock_holder: int) -> None:
    migrate = spawn("backend.db.migrate", WORKER_MIGRATION_LOCK_TIMEOUT_S=3)
    waiting = migrate.wait_for("MIGRATION_WAITING", timeout=10)
    assert time.monotonic() - migrate.spawned < 5
    assert waiting["holder_pid"] == lock_holder
    assert waiting["holder_application_name"] == HOLDER_NAME
    assert waiting["holder_backend_start"] and waiting["holder_state"] == "idle"
    assert f"pg_terminate_backend({lock_holder})" in waiting["fix"]

    failed = migrate.wait_for("MIGRATION_FAILED", timeout=10)
    assert migrate.wait_exit() == 1
    assert failed["error_type"] == "MigrationLockTimeout"
    assert f"pid {lock_holder}" in failed["error"] and HOLDER_NAME in failed["error"]
    assert "WORKER_MIGRATION_LOCK_TIMEOUT_S=3" in failed["error"]
    assert f"pg_terminate_backend({lock_holder})" in failed["error"]
    assert [e["event"] for e in migrate.events][-1] == "MIGRATION_FAILED"
    assert "MIGRATIONS_DONE" not in [e["event"] for e in migrate.events]


def test_a_dev_worker_waiting_for_the_lock_fails_its_boot_within_its_budget(
    spawn: Spawn, lock_holder: int
) -> None:
    worker = spawn(WORKER_BOOT_TIMEOUT_S=3)
    waiting = worker.wait_for("MIGRATION_WAITING", timeout=10)
    assert waiting["holder_pid"] == lock_holder and waiting["timeout_s"] == 3
    boot = worker.wait_for("WORKER_BOOT", timeout=10)
    assert worker.wait_exit() == 1
    assert boot["db_status"] == "error" and boot["error_type"] == "MigrationLockTimeout"
    assert f"pid {lock_holder}" in boot["error"] and "WORKER_BOOT_TIMEOUT_S=3" in boot["error"]
    assert worker.wait_for("WORKER_CRASH")["exit_code"] == 1


def _with_query(url: str, parameter: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, parameter]))))


POOLER_URLS: dict[str, Callable[[str], str]] = {
    # Nothing listens there: a connection attempt would retry (DB_BOOT_RETRY) for the boot budget.
    "port-6543": lambda _url: "postgresql://postgres:pw@127.0.0.1:6543/postgres",
    # A live server the URL marks as the pooler: a worker that connected would migrate and run.
    "pgbouncer-true": lambda url: _with_query(url, "pgbouncer=true"),
}


@pytest.mark.parametrize("shape", sorted(POOLER_URLS))
def test_a_dev_worker_refuses_the_transaction_pooler_before_it_connects(
    spawn: Spawn, clean_db: str, shape: str
) -> None:
    url = with_password(POOLER_URLS[shape](clean_db), PASSWORD)
    worker = spawn(db_url=None, SUPABASE_DB_URL=url, WORKER_BOOT_TIMEOUT_S=10)
    assert worker.wait_exit(timeout=20) == 1
    assert time.monotonic() - worker.spawned < 8
    events = [e["event"] for e in worker.events]
    assert events == ["WORKER_BOOT", "WORKER_CRASH"], worker.tail()
    crash = worker.named("WORKER_CRASH")[0]
    assert crash["error_type"] == "ConfigError" and crash["variable"] == "SUPABASE_DB_URL"
    assert "migrations need a session connection" in crash["error"] and "6543" in crash["error"]


FUTURE = latest_version() + 2  # a newer release's contract step ...
REQUIRES = latest_version() + 1  # ... that breaks code older than its schema


@pytest.fixture
def future_contract(db: psycopg.Connection[Any]) -> Iterator[None]:
    """The row a newer release writes when it applies a contract step this code predates."""
    db.execute(
        "INSERT INTO workers.schema_migrations (version, name, requires_schema) VALUES (%s, %s, %s)",
        (FUTURE, "future_contract", REQUIRES),
    )
    try:
        yield
    finally:
        db.execute("DELETE FROM workers.schema_migrations WHERE version = %s", (FUTURE,))


@pytest.mark.parametrize("mode", ["dev", "prod"])
def test_a_release_older_than_an_applied_contract_step_refuses_to_boot(
    spawn: Spawn, db: psycopg.Connection[Any], future_contract: None, mode: str
) -> None:
    msg_id = enqueue(db, "q_probe", job("rollback-1"))
    worker = spawn(SUPABASE_MODE=mode)
    assert worker.wait_exit() == 1
    assert [e["event"] for e in worker.events] == ["WORKER_BOOT", "WORKER_CRASH"], worker.tail()
    crash = worker.named("WORKER_CRASH")[0]
    assert crash["error_type"] == "ReleaseTooOld"
    assert f"contract step {FUTURE} (future_contract)" in crash["error"]
    assert f"deploy a release of schema {REQUIRES} or later" in crash["error"]
    row = db.execute("SELECT read_ct FROM pgmq.q_q_probe WHERE msg_id = %s", (msg_id,)).fetchone()
    assert row == {"read_ct": 0}


@pytest.mark.parametrize("args", [[], ["--check"]], ids=["migrate", "check"])
def test_migrate_of_an_older_release_refuses_too(
    clean_db: str, future_contract: None, args: list[str]
) -> None:
    env = inherited_env(SUPABASE_MODE="dev", SUPABASE_DB_URL=clean_db)
    done = subprocess.run(
        [sys.executable, "-m", "backend.db.migrate", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["MIGRATION_FAILED"]
    assert lines[0]["data"]["error_type"] == "ReleaseTooOld"
    assert f"schema {REQUIRES} or later" in lines[0]["data"]["error"]
