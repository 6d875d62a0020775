"""Loops seen through restarts: heartbeat rows written the way a replica restarted by Railway
leaves them (a new instance seconds after each exit, same RAILWAY_REPLICA_ID, a live fresh
instance last), judged from the replica's history rather than from its current instance."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.integration.test_worker_inspector import codes, column, inspector, report, send
from tools.worker_inspector.model import Options
from tools.worker_inspector.report import build_report
from tools.worker_inspector.watch import screen_lines

Conn = psycopg.Connection[Any]
QUEUE = "q_collectability"
MB = 1048576


_SESSIONS: list[psycopg.Connection[Any]] = []


@pytest.fixture(autouse=True)
def _close_sessions() -> Iterator[None]:
    yield
    while _SESSIONS:
        _SESSIONS.pop().close()


def instance(
    db: Conn,
    worker_id: str,
    status: str,
    *,
    started_s: float,
    beat_s: float,
    replica: str = "replica-1",
    failure: dict[str, Any] | None = None,
    job_key: str | None = None,
    live: bool = False,
) -> None:
    """One instance's row as the runtime leaves it: started ``started_s`` before now, its
    row last written ``beat_s`` before now (``stopped_at`` then, when STOPPED or CRASHED),
    the runtime's metadata, and what a crash records. ``live``: its process runs, so a
    session named by its worker id is open (until the test ends)."""
    if live:
        _SESSIONS.append(psycopg.connect(db.info.dsn, application_name=worker_id, autocommit=True))
    job = {"key": job_key, "msg_id": 9, "jobs": 1, "deadline_s": 60, "since": None} if job_key else None
    metadata = {
        "RAILWAY_REPLICA_ID": replica,
        "RAILWAY_DEPLOYMENT_ID": "deploy-1",
        "RAILWAY_SERVICE_NAME": "collectability",
        "peak_rss_bytes": 470 * MB,
        "schema": 9,
        "heartbeat_interval_s": 30,
        "visibility_timeout_s": 30,
        "pooled": False,
        "named_sessions": True,
        "job_timeout_s": 60,
        "job": job,
        **(failure or {}),
    }
    db.execute(
        "INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname, pid,"
        " version, git_sha, started_at, last_heartbeat_at, stopped_at, jobs_processed, jobs_failed,"
        " rss_bytes, metadata)"
        " VALUES (%(id)s, %(q)s, %(q)s, %(status)s, %(id)s, 1, '0.1.0', NULL,"
        " now() - make_interval(secs => %(started)s), now() - make_interval(secs => %(beat)s),"
        " CASE WHEN %(status)s IN ('STOPPED', 'CRASHED') THEN now() - make_interval(secs => %(beat)s) END,"
        " 0, 0, %(rss)s, %(meta)s)",
        {
            "id": worker_id,
            "q": QUEUE,
            "status": status,
            "started": started_s,
            "beat": beat_s,
            "rss": 460 * MB,
            "meta": Jsonb(metadata),
        },
    )


def kill_loop(db: Conn, ago_s: float = 0) -> None:
    """Three instances killed (OOM) about 5 s after boot, restarted every 6 s, each with the
    same job in hand; then the fresh instance that runs now. ``ago_s`` moves the kills back."""
    for n, start in enumerate((26, 20, 14)):
        instance(
            db, f"w-kill-{n}", "RUNNING", started_s=start + ago_s, beat_s=start + ago_s - 1, job_key="j-9"
        )
    instance(db, "w-live", "RUNNING", started_s=8 + ago_s, beat_s=1, live=True)


def loops(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in findings if f["code"] == "crash_loop"]


def test_a_sigkill_loop_behind_a_live_instance_is_a_crash_loop(db: Conn, clean_db: str) -> None:
    kill_loop(db)
    code, doc = report(clean_db)
    assert code == 1 and doc["verdict"] == "unhealthy"
    [loop] = loops(doc["reasons"])
    assert loop["subject"] == QUEUE
    message = loop["message"]
    assert "replica replica-1: 3 unclean ends within 10m (3 killed)" in message
    assert "OOM kill or SIGKILL, exit 137" in message and "peak RSS 470.0 MB" in message
    assert "jobs in hand when they ended: j-9 (3x)" in message
    assert "raise the service's memory by 256 MB" in message and "dead-letter the job" in message

    text = inspector(clean_db)
    assert text.returncode == 1
    assert text.stdout.startswith("worker inspector: UNHEALTHY")
    assert message in text.stdout


def test_a_crash_loop_holds_through_clean_boots_and_clears_after_ten_clean_minutes(
    db: Conn, clean_db: str
) -> None:
    kill_loop(db, ago_s=9 * 60)  # the last kill 9 minutes ago; the replica has run since
    code, doc = report(clean_db)
    assert code == 1
    assert [f["subject"] for f in loops(doc["reasons"])] == [QUEUE]

    db.execute("DELETE FROM workers.heartbeats")
    kill_loop(db, ago_s=11 * 60)
    code, doc = report(clean_db)
    assert code == 0, doc["reasons"]
    assert loops(doc["reasons"]) == []
    assert codes(doc["warnings"]) == {("replaced_dead_worker", f"w-kill-{n}") for n in range(3)}


def test_failed_boots_and_crashes_name_the_variable_the_error_and_the_jobs(db: Conn, clean_db: str) -> None:
    bad = {
        "error": "WORKER_BATCH_SIZE: 'abc' is not a whole number",
        "error_type": "ConfigError",
        "variable": "WORKER_BATCH_SIZE",
        "state_before": "BOOTING",
        "exit_code": 1,
    }
    for n, start in enumerate((30, 24, 18)):
        instance(db, f"w-boot-{n}", "CRASHED", started_s=start, beat_s=start - 1, failure=bad)
    boom = {"error": "division by zero", "error_type": "ZeroDivisionError", "state_before": "RUNNING"}
    for n, start in enumerate((40, 30, 20)):
        failure = {**boom, "exit_code": 1, "job_keys": ["judgment-7", "judgment-8"]}
        instance(
            db, f"w-job-{n}", "CRASHED", started_s=start, beat_s=start - 5, replica="r-2", failure=failure
        )
    for replica in ("replica-1", "r-2"):
        instance(db, f"w-live-{replica}", "RUNNING", started_s=10, beat_s=1, replica=replica, live=True)

    code, doc = report(clean_db)
    assert code == 1
    boot, job = sorted(loops(doc["reasons"]), key=lambda f: "r-2" in f["message"])
    assert "3 failed boot" in boot["message"] and "(variable WORKER_BATCH_SIZE)" in boot["message"]
    assert "ConfigError: WORKER_BATCH_SIZE: 'abc' is not a whole number" in boot["message"]
    assert "fix: set WORKER_BATCH_SIZE right" in boot["message"]
    assert "3 crashed" in job["message"] and "exit 1, ZeroDivisionError: division by zero" in job["message"]
    assert "judgment-7 (3x), judgment-8 (3x)" in job["message"]


def test_a_clean_history_has_no_replica_finding(db: Conn, clean_db: str) -> None:
    """Redeploys stop instances cleanly after uptimes that differ: no loop, no pattern."""
    for n, (start, uptime) in enumerate(((900, 200), (690, 40), (640, 100))):
        instance(db, f"w-old-{n}", "STOPPED", started_s=start, beat_s=start - uptime)
    instance(db, "w-live", "RUNNING", started_s=530, beat_s=2, live=True)
    code, doc = report(clean_db)
    assert code == 0, doc["reasons"]
    assert doc["warnings"] == []


def test_sigterm_stops_after_the_same_short_uptime_are_a_restart_pattern(db: Conn, clean_db: str) -> None:
    # Stopped by SIGTERM after 28, 29 and 27 s; each next instance boots 2 s later.
    for n, (start, uptime) in enumerate(((92, 28), (62, 29), (31, 27))):
        instance(db, f"w-term-{n}", "STOPPED", started_s=start, beat_s=start - uptime)
    instance(db, "w-live", "RUNNING", started_s=2, beat_s=1, live=True)

    code, doc = report(clean_db)
    assert code == 0, doc["reasons"]
    [pattern] = [f for f in doc["warnings"] if f["code"] == "restart_pattern"]
    assert pattern["subject"] == QUEUE
    assert "stopped by SIGTERM after 28s, 29s, 27s of uptime: restarted every ~30s" in pattern["message"]
    assert "a healthcheck left on" in pattern["message"] and "cron" in pattern["message"]
    text = inspector(clean_db)
    assert text.returncode == 0 and pattern["message"] in text.stdout


def test_an_instance_killed_while_draining_is_a_drain_cut_short(db: Conn, clean_db: str) -> None:
    """An old deployment SIGTERMed, then SIGKILLed before its drain ended; the new one runs."""
    instance(db, "w-old-deploy", "DRAINING", started_s=3600, beat_s=70, replica="replica-old")
    instance(db, "w-new-deploy", "RUNNING", started_s=80, beat_s=1, replica="replica-new", live=True)

    code, doc = report(clean_db)
    [cut] = [f for f in doc["warnings"] if f["code"] == "drain_cut_short"]
    assert cut["subject"] == "w-old-deploy"
    assert "killed while DRAINING" in cut["message"]
    assert (
        "RAILWAY_DEPLOYMENT_DRAINING_SECONDS" in cut["message"] and "WORKER_DRAIN_TIMEOUT_S" in cut["message"]
    )
    # Its replica never came back: still a dead worker, whose message points at the drain.
    assert code == 1
    [dead] = [f for f in doc["reasons"] if f["code"] == "dead_worker"]
    assert "killed while draining" in dead["message"]


def test_the_note_shows_a_crashed_workers_error_and_watch_shows_delayed(db: Conn, clean_db: str) -> None:
    boom = {"error": "division by zero " * 10, "error_type": "ZeroDivisionError", "exit_code": 1}
    instance(db, "w-crashed", "CRASHED", started_s=100, beat_s=50, failure=boom)
    for _ in range(3):
        send(db, QUEUE, {"n": 1}, delay=60)
    send(db, QUEUE, {"n": 2})

    lines = inspector(clean_db).stdout.splitlines()
    note = column(lines, "w-crashed", "NOTE")
    assert note.startswith("ZeroDivisionError: division by zero") and note.endswith("...")

    with psycopg.connect(clean_db, row_factory=dict_row) as conn:
        screen = screen_lines(build_report(conn, Options()), 2.0)
    head = next(line for line in screen if line.startswith("QUEUE"))
    row = next(line for line in screen if line.startswith(QUEUE))
    assert "DELAYED" in head
    cells = dict(zip([*head.split()[:3], "IN FLIGHT", *head.split()[5:]], row.split(), strict=True))
    assert (cells["DEPTH"], cells["VISIBLE"], cells["IN FLIGHT"], cells["DELAYED"]) == ("4", "1", "0", "3")
