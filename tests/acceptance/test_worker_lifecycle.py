"""The runtime as operators see it: a real worker process, real signals, a real database."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from backend.db.embedded import EmbeddedPostgres
from backend.enqueue import build_envelope, enqueue
from scripts.harness.process import WorkerProcess
from tests.helpers import PASSWORD, wait_until
from tests.netcut import CuttableProxy

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]


def heartbeat(db: psycopg.Connection[Any], worker_id: str) -> dict[str, Any] | None:
    row: dict[str, Any] | None = db.execute(
        "SELECT * FROM workers.heartbeats WHERE worker_id = %s", (worker_id,)
    ).fetchone()
    return row


def job(key: str, **payload: Any) -> dict[str, Any]:
    return build_envelope(
        entity_type="probe", entity_id=key, org_id="org-test", idempotency_key=key, payload=payload
    )


def test_boot_logs_worker_boot_and_keeps_the_heartbeat_fresh(
    spawn: Spawn, db: psycopg.Connection[Any]
) -> None:
    worker = spawn(WORKER_HEARTBEAT_INTERVAL_S=0.2)
    boot = worker.wait_for("WORKER_BOOT")
    assert boot["db_status"] == "ok"
    assert boot["worker_name"] == "q_probe" and boot["concurrency"] == 1
    for field in ("worker_id", "version", "git_sha", "mode", "hostname", "pid"):
        assert field in boot
    assert (boot["from"], boot["to"], boot["trigger"]) == ("BOOTING", "RUNNING", "booted")
    first = wait_until(lambda: heartbeat(db, boot["worker_id"]))
    assert first["status"] == "RUNNING"
    seen = {first["last_heartbeat_at"]}
    wait_until(
        lambda: seen.add(heartbeat(db, boot["worker_id"])["last_heartbeat_at"]) or len(seen) >= 4, timeout=5
    )
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0


def test_sigterm_while_idle_drains_and_exits_zero(spawn: Spawn, db: psycopg.Connection[Any]) -> None:
    worker = spawn()
    boot = worker.wait_for("WORKER_BOOT")
    worker.send(signal.SIGTERM)
    draining = worker.wait_for("WORKER_DRAINING")
    assert draining["reason"] == "SIGTERM (Deployment/Scale-down)"
    assert draining["drain_timeout_s"] == 25.0 and draining["in_flight"] == 0
    shutdown = worker.wait_for("WORKER_SHUTDOWN")
    assert shutdown["reason"] == "SIGTERM (Deployment/Scale-down)"
    assert shutdown["drained"] is True and shutdown["exit_code"] == 0
    assert (shutdown["from"], shutdown["to"]) == ("DRAINING", "STOPPED")
    assert worker.wait_exit() == 0
    row = heartbeat(db, boot["worker_id"])
    assert row is not None and row["status"] == "STOPPED" and row["stopped_at"] is not None


def test_sigterm_during_a_slow_job_lets_it_finish(spawn: Spawn, db: psycopg.Connection[Any]) -> None:
    worker = spawn()
    worker.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("slow-1", sleep_s=1.5))
    worker.wait_for("PROBE_IN_HANDLER")
    worker.send(signal.SIGTERM)
    assert worker.wait_for("WORKER_DRAINING")["in_flight"] == 1
    assert worker.wait_exit() == 0
    assert worker.wait_for("WORKER_SHUTDOWN")["jobs_processed"] == 1
    assert db.execute("SELECT count(*) AS n FROM probe.effects").fetchone()["n"] == 1
    status = db.execute("SELECT status FROM workers.processed_jobs WHERE job_key = 'slow-1'").fetchone()
    assert status["status"] == "completed"
    assert db.execute("SELECT count(*) AS n FROM pgmq.q_q_probe").fetchone()["n"] == 0


def test_second_sigterm_abandons_the_job_and_its_writes(spawn: Spawn, db: psycopg.Connection[Any]) -> None:
    worker = spawn()
    worker.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("slow-2", sleep_s=30))
    worker.wait_for("PROBE_IN_HANDLER")
    worker.send(signal.SIGTERM)
    worker.wait_for("WORKER_DRAINING")
    started = time.monotonic()
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 143
    assert time.monotonic() - started < 3
    shutdown = worker.wait_for("WORKER_SHUTDOWN")
    assert shutdown["drained"] is False and shutdown["exit_code"] == 143
    assert db.execute("SELECT count(*) AS n FROM probe.effects").fetchone()["n"] == 0
    assert db.execute("SELECT count(*) AS n FROM workers.processed_jobs").fetchone()["n"] == 0
    visible = db.execute("SELECT count(*) AS n FROM pgmq.q_q_probe WHERE vt <= clock_timestamp()")
    assert visible.fetchone()["n"] == 1


def test_drain_timeout_abandons_with_143(spawn: Spawn, db: psycopg.Connection[Any]) -> None:
    worker = spawn(WORKER_DRAIN_TIMEOUT_S=0.5)
    worker.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("slow-3", sleep_s=30))
    worker.wait_for("PROBE_IN_HANDLER")
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 143
    assert "drain timeout" in worker.wait_for("WORKER_SHUTDOWN")["abandoned"]
    assert db.execute("SELECT count(*) AS n FROM probe.effects").fetchone()["n"] == 0


def test_unreachable_database_fails_boot_within_the_budget(spawn: Spawn) -> None:
    started = time.monotonic()
    worker = spawn(db_url="postgresql://dragonfly@127.0.0.1:1/nowhere", WORKER_BOOT_TIMEOUT_S=2)
    assert worker.wait_exit() == 1
    elapsed = time.monotonic() - started
    boot = worker.wait_for("WORKER_BOOT")
    assert boot["db_status"] == "error" and boot["error_type"] == "OperationalError"
    crash = worker.wait_for("WORKER_CRASH")
    assert crash["exit_code"] == 1 and crash["state_before"] == "BOOTING"
    assert len(worker.named("DB_BOOT_RETRY")) >= 1
    assert 2 <= elapsed < 2 + 8


def test_sigterm_while_boot_retries_is_a_clean_stop(spawn: Spawn) -> None:
    """A redeploy's SIGTERM reaching a worker that retries its boot (the database or its
    pooler briefly down): nothing was taken, so it stops cleanly, not as a failed boot."""
    worker = spawn(db_url="postgresql://dragonfly@127.0.0.1:1/nowhere", WORKER_BOOT_TIMEOUT_S=30)
    worker.wait_for("DB_BOOT_RETRY")
    time.sleep(1)
    worker.send(signal.SIGTERM)
    assert worker.wait_exit(timeout=10) == 0
    shutdown = worker.wait_for("WORKER_SHUTDOWN")
    assert (shutdown["from"], shutdown["exit_code"]) == ("DRAINING", 0)
    assert not worker.named("WORKER_CRASH")
    assert [b.get("db_status") for b in worker.named("WORKER_BOOT")] == []


def test_sigterm_while_its_pooler_is_briefly_down_leaves_a_stopped_row(
    spawn: Spawn, db: psycopg.Connection[Any], clean_db: str
) -> None:
    """Boot retries a database that does not answer (a proxy passing no bytes); SIGTERM comes
    as it answers again: a clean stop whose row says STOPPED."""
    proxy = CuttableProxy(clean_db)
    try:
        proxy.cut()
        worker = spawn(SUPABASE_DB_URL=proxy.url(PASSWORD), WORKER_BOOT_TIMEOUT_S=60)
        worker.wait_for("DB_BOOT_RETRY", timeout=20)
        proxy.heal()
        worker.send(signal.SIGTERM)
        assert worker.wait_exit(timeout=20) == 0
        shutdown = worker.wait_for("WORKER_SHUTDOWN")
        assert not worker.named("WORKER_CRASH")
        row = db.execute(
            "SELECT status FROM workers.heartbeats WHERE worker_id = %s", (shutdown["worker_id"],)
        ).fetchone()
        assert row is not None and row["status"] == "STOPPED"
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SUPABASE_MODE": "prod", "SUPABASE_DB_URL": ""}, "SUPABASE_DB_URL"),
        ({"WORKER_BATCH_SIZE": "lots"}, "WORKER_BATCH_SIZE"),
        ({"WORKER_HEARTBEAT_INTERVAL_S": "30s"}, "WORKER_HEARTBEAT_INTERVAL_S"),
        ({"SUPABASE_MODE": "staging"}, "SUPABASE_MODE"),
        (
            {
                "SUPABASE_MODE": "prod",
                "SUPABASE_DB_URL": "postgresql://u:s3cret-Pw-do-not-print@db.example.com:5432/postgres?sslmode=disable",
            },
            "SUPABASE_DB_URL",
        ),
    ],
)
def test_bad_configuration_is_one_clear_error_and_exit_one(
    spawn: Spawn, env: dict[str, str], variable: str
) -> None:
    worker = spawn(**env)
    assert worker.wait_exit() == 1
    boot = worker.wait_for("WORKER_BOOT")
    assert boot["db_status"] == "error" and boot["error_type"] == "ConfigError"
    assert variable in boot["error"] and boot["variable"] == variable
    assert worker.wait_for("WORKER_CRASH")["exit_code"] == 1
    assert not any("Traceback" in line for line in worker.lines)


def test_database_outage_is_survived(
    spawn: Spawn, db: psycopg.Connection[Any], pg_server: EmbeddedPostgres
) -> None:
    worker = spawn(WORKER_HEARTBEAT_INTERVAL_S=0.2)
    boot = worker.wait_for("WORKER_BOOT")
    db.close()
    pg_server.stop("fast")
    worker.wait_for("DB_OUTAGE", timeout=10)
    time.sleep(3)
    url = pg_server.start()
    worker.wait_for("DB_RECOVERED", timeout=20)
    assert worker.named("DB_RETRY"), "each retry is logged with its attempt and delay"
    assert {"attempt", "delay_s"} <= set(worker.named("DB_RETRY")[0])
    with psycopg.connect(url, autocommit=True) as conn:

        def beat() -> Any:
            row = conn.execute(
                "SELECT last_heartbeat_at > clock_timestamp() - interval '1 second'"
                " AS fresh FROM workers.heartbeats WHERE worker_id = %s",
                (boot["worker_id"],),
            ).fetchone()
            return row and row[0]

        wait_until(beat, timeout=15)
        enqueue(conn, "q_probe", job("after-outage"))
        wait_until(lambda: conn.execute("SELECT count(*) FROM probe.effects").fetchone()[0] == 1)
    assert not worker.named("WORKER_CRASH")
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0


def test_memory_soft_limit_drains_then_crashes_with_memory_error(spawn: Spawn) -> None:
    worker = spawn(WORKER_MEMORY_LIMIT_MB=8, WORKER_MEMORY_CHECK_INTERVAL_S=0.05)
    assert worker.wait_exit() == 1
    draining = worker.wait_for("WORKER_DRAINING")
    assert draining["reason"] == "memory soft limit"
    crash = worker.wait_for("WORKER_CRASH")
    assert crash["error_type"] == "MemoryError" and crash["exit_code"] == 1
    assert crash["soft_limit_mb"] == pytest.approx(7.2) and crash["rss_mb"] > 7.2


def test_sigterm_during_an_outage_still_drains_and_exits_zero(
    spawn: Spawn, db: psycopg.Connection[Any], pg_server: EmbeddedPostgres
) -> None:
    worker = spawn(WORKER_DRAIN_TIMEOUT_S=10)
    worker.wait_for("WORKER_BOOT")
    db.close()
    pg_server.stop("fast")
    try:
        worker.wait_for("DB_OUTAGE", timeout=10)
        time.sleep(3)  # well into the reconnect backoff
        sent = time.monotonic()
        worker.send(signal.SIGTERM)
        assert worker.wait_exit() == 0
        assert time.monotonic() - sent < 10, "exits within its drain timeout, not by the deadline"
        assert worker.wait_for("WORKER_SHUTDOWN")["drained"] is True
    finally:
        pg_server.start()


def test_railway_ids_are_recorded_in_the_boot_event_and_the_heartbeat(
    spawn: Spawn, db: psycopg.Connection[Any]
) -> None:
    worker = spawn(
        RAILWAY_REPLICA_ID="replica-7", RAILWAY_SERVICE_NAME="collectability", RAILWAY_GIT_COMMIT_SHA="abc123"
    )
    boot = worker.wait_for("WORKER_BOOT")
    assert boot["railway"]["RAILWAY_REPLICA_ID"] == "replica-7" and boot["git_sha"] == "abc123"
    row = wait_until(lambda: heartbeat(db, boot["worker_id"]))
    assert row["metadata"]["RAILWAY_SERVICE_NAME"] == "collectability" and row["git_sha"] == "abc123"
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0


def test_memory_drain_that_cannot_finish_still_ends_as_a_memory_crash(
    spawn: Spawn, db: psycopg.Connection[Any]
) -> None:
    worker = spawn(WORKER_MEMORY_LIMIT_MB=160, WORKER_MEMORY_CHECK_INTERVAL_S=0.05, WORKER_DRAIN_TIMEOUT_S=1)
    worker.wait_for("WORKER_BOOT")
    enqueue(db, "q_probe", job("hog", rss_mb=150, sleep_s=30))
    assert worker.wait_exit() == 1
    assert worker.wait_for("WORKER_DRAINING")["reason"] == "memory soft limit"
    crash = worker.wait_for("WORKER_CRASH")
    assert crash["error_type"] == "MemoryError" and crash["drained"] is False
    assert crash["exit_code"] == 1 and crash["rss_mb"] > crash["soft_limit_mb"]
    assert db.execute("SELECT count(*) AS n FROM probe.effects").fetchone()["n"] == 0


def test_a_new_instance_says_how_the_previous_one_on_its_replica_ended(
    spawn: Spawn, db: psycopg.Connection[Any]
) -> None:
    first = spawn(WORKER_MEMORY_CHECK_INTERVAL_S="0.1")
    assert first.wait_for("WORKER_BOOT")["previous"] is None
    enqueue(db, "q_probe", job("hog", rss_mb=80))
    wait_until(lambda: db.execute("SELECT count(*) AS n FROM probe.effects").fetchone()["n"] == 1)
    time.sleep(0.5)  # a memory sample and a heartbeat after the allocation
    first.send(signal.SIGKILL)
    first.wait_exit()
    second = spawn()
    previous = second.wait_for("WORKER_BOOT")["previous"]
    assert previous["worker_id"] == first.wait_for("WORKER_BOOT")["worker_id"]
    assert previous["status"] == "RUNNING" and previous["clean"] is False  # killed
    assert previous["jobs_processed"] == 1 and previous["peak_rss_mb"] >= 80
    second.send(signal.SIGTERM)
    assert second.wait_exit() == 0
    third = spawn()
    after_clean = third.wait_for("WORKER_BOOT")["previous"]
    assert after_clean["status"] == "STOPPED" and after_clean["clean"] is True
