"""The job a worker has in hand, as its heartbeat row carries it (``metadata.job``), in the
inspector's report: shown per worker, a warning past half its deadline (``long_job``),
unhealthy past it (``hung_job``), and left to the verdict of a worker that is gone."""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.integration.test_worker_inspector import add_worker, by_id, codes, column, inspector, report
from tools.worker_inspector.history import read_history
from tools.worker_inspector.html import render_html
from tools.worker_inspector.model import Options
from tools.worker_inspector.report import build_report
from tools.worker_inspector.watch import screen_lines

Conn = psycopg.Connection[Any]

STACK = [
    "backend/workers/processor.py:176 in attempt",
    "backend/workers/outbox_processor.py:57 in handle",
    "backend/domain/outbox.py:131 in deliver",
    "tests/workers/probe.py:88 in _hang",
]
# The heartbeat's pace: it is also the time an alive worker has, past a deadline, to
# interrupt the call or exit and say so in its row.
BEAT = {"heartbeat_interval_s": 30, "job_timeout_s": 60}


def hold_job(db: Conn, worker_id: str, started_s_ago: float, **job: Any) -> None:
    """Write ``metadata.job`` into a worker's row as the runtime does: ``since`` is the
    call's start in UTC ISO-8601, here that many seconds before the database's now()."""
    row = db.execute("SELECT now() AS now").fetchone()
    assert row is not None
    since = (row["now"] - timedelta(seconds=started_s_ago)).astimezone(UTC).isoformat()
    job = {"key": f"{worker_id}-job", "msg_id": 7, "jobs": 1, "deadline_s": 60, "since": since, **job}
    db.execute(
        "UPDATE workers.heartbeats SET metadata = metadata || jsonb_build_object('job', %s::jsonb)"
        " WHERE worker_id = %s",
        (Jsonb(job), worker_id),
    )


def test_each_worker_shows_its_job_in_hand_and_a_fresh_one_is_healthy(db: Conn, clean_db: str) -> None:
    add_worker(db, "w-batch", "q_collectability", "RUNNING", 1, metadata=BEAT)
    hold_job(db, "w-batch", 5, key="judgment-42-score", msg_id=3481, jobs=20)
    add_worker(db, "w-idle", "q_escalation", "RUNNING", 1, metadata={**BEAT, "job": None})

    code, doc = report(clean_db)
    assert code == 0, doc["reasons"]
    assert doc["warnings"] == []
    batch, idle = by_id(doc)["w-batch"], by_id(doc)["w-idle"]
    assert (batch["job_timeout_s"], idle["job_timeout_s"], idle["job"]) == (60, 60, None)
    job = batch["job"]
    assert {k: job[k] for k in ("key", "msg_id", "jobs", "deadline_s", "stack")} == {
        "key": "judgment-42-score",
        "msg_id": 3481,
        "jobs": 20,
        "deadline_s": 60,
        "stack": [],
    }
    assert 5 <= job["age_s"] < 30 and 3 <= job["held_s"] < 5
    assert job["since"].endswith("+00:00")

    text = inspector(clean_db)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert column(lines, "w-batch", "JOB") == "judgment-42-score +19"
    header = next(line for line in lines if line.startswith("NAME "))
    age = next(line for line in lines if "w-batch" in line)[header.index("JOB AGE") :][:7]
    assert age.strip() in {f"{s}s" for s in range(5, 30)}
    assert column(lines, "w-idle", "JOB") == "-"

    # watch draws the same, and so does the HTML report's instance timeline.
    options = Options(stale_after_s=60, dead_after_s=180)
    built = build_report(db, options, database="db")
    screen = screen_lines(built, 2)
    assert "JOB AGE  JOB" in next(line for line in screen if line.startswith("WORKER"))
    assert next(line for line in screen if line.startswith("w-batch")).endswith("judgment-42-score +19")
    assert "; job judgment-42-score +19 for " in render_html(built, read_history(db, 3600))


def test_a_job_past_half_its_deadline_is_a_long_job_warning_with_its_stack(db: Conn, clean_db: str) -> None:
    add_worker(db, "w-slow", "q_outbox_processor", "RUNNING", 1, metadata=BEAT)
    hold_job(db, "w-slow", 41, key="notify-123", stack=STACK)
    add_worker(db, "w-young", "q_outbox_processor", "RUNNING", 1, metadata=BEAT)
    hold_job(db, "w-young", 35, key="notify-124")  # no stack yet
    # Past the deadline by less than a heartbeat: the worker is interrupting it.
    add_worker(db, "w-ending", "q_outbox_processor", "DRAINING", 1, metadata=BEAT)
    hold_job(db, "w-ending", 71, key="notify-125", stack=STACK[:2])

    code, doc = report(clean_db)
    assert code == 0, doc["reasons"]
    assert codes(doc["warnings"]) == {
        ("long_job", "w-slow"),
        ("long_job", "w-young"),
        ("long_job", "w-ending"),
    }
    slow = next(f for f in doc["warnings"] if f["subject"] == "w-slow")
    assert slow["message"].startswith("worker q_outbox_processor w-slow: job notify-123 (msg 7) has run for ")
    assert "over half its 1m deadline; waiting in tests/workers/probe.py:88 in _hang" in slow["message"]
    assert slow["stack"] == STACK
    young = next(f for f in doc["warnings"] if f["subject"] == "w-young")
    assert young["message"].endswith("its stack is not recorded yet") and young["stack"] == []
    ending = next(f for f in doc["warnings"] if f["subject"] == "w-ending")
    assert (
        "past its 1m deadline; waiting in backend/workers/outbox_processor.py:57 in handle"
        in ending["message"]
    )
    assert by_id(doc)["w-slow"]["job"]["stack"] == STACK

    text = inspector(clean_db)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "job notify-123" in line)
    assert lines[start + 1 : start + 2 + len(STACK)] == [
        "      stack, innermost last:",
        *(f"        {frame}" for frame in STACK),
    ]


def test_a_job_past_its_deadline_is_a_hung_job_and_unhealthy(db: Conn, clean_db: str) -> None:
    add_worker(db, "w-hung", "q_outbox_processor", "RUNNING", 1, metadata=BEAT)
    hold_job(db, "w-hung", 200, key="notify-9", msg_id=12, stack=STACK)
    # A job without a deadline of its own has the worker's.
    add_worker(db, "w-default", "q_collectability", "RUNNING", 1, metadata={**BEAT, "job_timeout_s": 100})
    hold_job(db, "w-default", 140, key="judgment-1", jobs=3, deadline_s=None)

    code, doc = report(clean_db)
    assert code == 1 and doc["verdict"] == "unhealthy"
    assert codes(doc["reasons"]) == {("hung_job", "w-hung"), ("hung_job", "w-default")}
    hung = next(f for f in doc["reasons"] if f["subject"] == "w-hung")
    message = hung["message"]
    assert message.startswith("worker q_outbox_processor w-hung: job notify-9 (msg 12) has run for 3m")
    assert "past its 1m deadline, at tests/workers/probe.py:88 in _hang" in message
    assert "stuck where Python cannot interrupt it" in message and "the process is frozen" in message
    assert "timeouts shorter than WORKER_JOB_TIMEOUT_S" in message
    assert "after WORKER_MAX_ATTEMPTS the job is dead-lettered JobTimedOut" in message
    assert hung["stack"] == STACK
    default = next(f for f in doc["reasons"] if f["subject"] == "w-default")
    assert (
        "job judgment-1 +2 (msg 7)" in default["message"] and "past its 1m40s deadline" in default["message"]
    )
    assert by_id(doc)["w-default"]["job"]["deadline_s"] == 100

    text = inspector(clean_db)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert lines[0] == "worker inspector: UNHEALTHY"
    assert any(
        "w-hung: job notify-9" in line and "at tests/workers/probe.py:88 in _hang" in line for line in lines
    )
    assert column(lines, "w-default", "JOB") == "judgment-1 +2"


def test_a_worker_that_is_gone_keeps_its_job_but_its_own_verdict_says_it(db: Conn, clean_db: str) -> None:
    """Dead, crashed and stopped workers' jobs are shown, never judged; a frozen worker's
    row is not rewritten, so its job is judged by its age."""
    add_worker(
        db, "w-killed", "q_outbox_processor", "RUNNING", 600, metadata={**BEAT, "RAILWAY_REPLICA_ID": "r-1"}
    )
    hold_job(db, "w-killed", 900, key="notify-dead", stack=STACK)
    add_worker(db, "w-crashed", "q_outbox_processor", "CRASHED", 30, metadata=BEAT)
    hold_job(db, "w-crashed", 500, key="notify-crash", stack=STACK)
    frozen = {**BEAT, "heartbeat_interval_s": 5, "named_sessions": True}
    add_worker(db, "w-frozen", "q_escalation", "RUNNING", 20, metadata=frozen)
    hold_job(db, "w-frozen", 70, key="escalate-1")  # 50 s at its last heartbeat, 70 s now

    with psycopg.connect(clean_db, application_name="w-frozen"):  # its session stays open
        code, doc = report(clean_db)
    workers = by_id(doc)
    assert {k: w["verdict"] for k, w in workers.items()} == {
        "w-killed": "dead",
        "w-crashed": "crashed",
        "w-frozen": "frozen",
    }
    assert code == 1
    assert codes(doc["reasons"]) == {
        ("dead_worker", "w-killed"),
        ("frozen_worker", "w-frozen"),
        ("hung_job", "w-frozen"),
    }
    assert "long_job" not in {f["code"] for f in doc["warnings"]}
    assert workers["w-killed"]["job"]["key"] == "notify-dead" and workers["w-killed"]["job"]["age_s"] >= 900
    assert workers["w-crashed"]["job"]["key"] == "notify-crash"
