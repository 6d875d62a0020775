"""The chaos run, CI-sized (``python -m scripts.chaos`` as a process: workers SIGTERM'd and
SIGKILL'd at random, PostgreSQL restarted, hung handlers, under a mixed workload), and proof
that its checks see what they are there to see: a planted duplicate, a lost job, a bad exit,
a hung job that was not dead-lettered as it must be."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from backend.db.embedded import PROJECT_ROOT, EmbeddedPostgres
from backend.domain.seed import seed_demo
from backend.enqueue import build_envelope, enqueue
from scripts.chaos.audit import install_audit, remove_audit
from scripts.chaos.effects import check_effects
from scripts.chaos.liveness import check_hung, check_stalls
from scripts.chaos.processes import ProcessRecord, check_processes
from scripts.chaos.receiver import Call
from scripts.chaos.workload import ORG_ID, Plan, build_plan, notify_key
from tests import chromium
from tools.worker_inspector import html as html_report

Conn = psycopg.Connection[Any]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_ci_sized_chaos_run_loses_nothing_and_doubles_nothing(
    clean_db: str, pg_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(1, 1_000_000))
    report_path = tmp_path / f"chaos-{seed}.json"
    command = [
        sys.executable,
        "-m",
        "scripts.chaos",
        "--url",
        clean_db,
        "--pgdata",
        str(pg_server.pgdata),
        "--seed",
        str(seed),
        "--duration",
        "15",
        "--jobs",
        "600",
        "--workers-per-kind",
        "2",
        "--kill-interval",
        "0.8",
        # 2 attempts on the chaos workers, so that their hung jobs (one of each way on each,
        # under the run's 2-s deadline) are dead-lettered within the time the run takes anyway.
        "--max-attempts",
        "2",
        "--report",
        str(report_path),
        "--logs",
        str(tmp_path / "logs"),
    ]
    started = time.monotonic()
    try:
        run = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=140)
    finally:
        pg_server.start()  # the run restarts the session's server: it must be up for the next test
    took = time.monotonic() - started
    output = f"seed {seed} (replay: CHAOS_SEED={seed}), {took:.0f} s\n{run.stdout}{run.stderr}"
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())
    if run.returncode != 0:  # what the replicas logged of the longest-waiting job, to read why
        output += _lines_naming(tmp_path / "logs", report["stalls"].get("longest_key"))
    assert run.returncode == 0, output
    assert report["passed"] and not report["violations"], output
    assert report["duplicates"]["count"] == 0 and report["lost"]["count"] == 0, output
    assert report["jobs"]["completed"] == report["jobs"]["expected"] >= 600, output
    letters = report["dead_letters"]
    assert letters["total"] == letters["matched"] == report["jobs"]["poison"] > 0, output
    assert report["kills"]["SIGTERM"] >= 1 and report["kills"]["SIGKILL"] >= 1, output
    assert report["processes"]["problem_count"] == 0, output
    assert report["processes"]["recognised_dead"] == report["processes"]["sigkilled"] >= 1, output
    assert report["stuck_claims"]["count"] == 0, output
    assert report["freezes"]["count"] >= 1, output
    assert report["killer_jobs"]["count"] == 3 and report["killer_jobs"]["worker_exits"] >= 1, output
    hung = report["hung_jobs"]
    assert hung["count"] == 4 and hung["by_way"] == {"loop": 2, "recv": 2} and not hung["problems"], output
    assert hung["timed_out"]["interrupted"] >= 1 and hung["worker_exits"] >= 1, output
    assert report["stalls"]["over_limit"] == 0, output
    assert report["stalls"]["longest_s"] <= report["stalls"]["limit_s"], output
    assert report["db_restart"]["recovery_s"] is not None, output
    effects = report["effects"]
    by_worker = report["jobs"]["by_worker"]
    receiver_keys = by_worker["outbox_processor"] + by_worker["chaos_external"]
    assert effects["receiver_accepted_keys"] == receiver_keys, output
    assert effects["score_rows"] == by_worker["collectability"], output
    assert (
        effects["recommendations"]
        == effects["notifications_enqueued"]
        == report["jobs"]["by_worker"]["escalation"]
    ), output

    # What the chaos left behind, drawn: the HTML report, rendered offline by Chromium.
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_"))}
    drawn = subprocess.run(
        [sys.executable, "-m", "tools.worker_inspector", "report", "--html", str(page), "--since", "1h"],
        cwd=PROJECT_ROOT,
        env={**env, "SUPABASE_MODE": "dev", "SUPABASE_DB_URL": clean_db},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert drawn.returncode in (0, 1) and page.exists(), drawn.stderr
    check_drawn(page, shot)


def check_drawn(page: Path, shot: Path) -> None:
    """Every chart of the report has data, Chromium draws it with no console message and no
    network, and the screenshot shows the series' colours."""
    text = page.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    charts = re.findall(r'<svg class="chart[^"]*"[^>]*data-series="(\d+)" data-points="(\d+)"', text)
    assert len(charts) == 6 and all(int(points) > 0 for _, points in charts), charts
    assert chromium.screenshot(page, shot, height=3200) == []
    seen = chromium.colour_counts(shot)
    series = max(int(n) for n, _ in charts[:5])
    for colour in html_report.COLOURS[: min(series, 3)]:
        assert seen[chromium.hex_rgb(colour)] > 20, colour


# --- the checks themselves, on a database state built by hand ------------------------------


@pytest.fixture
def audited(db: Conn) -> Iterator[Conn]:
    """The test database with the chaos audit triggers, removed afterwards."""
    install_audit(db)
    yield db
    remove_audit(db)


def _small_plan(db: Conn) -> Plan:
    seeded = seed_demo(db, judgments=4, cases=2, org_id=ORG_ID, seed=3)
    return build_plan(
        seed=3, judgment_ids=seeded["judgment_ids"], case_ids=seeded["case_ids"], notes=3, waves=2
    )


def _complete(db: Conn, key: str) -> None:
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts)"
        " VALUES (%s, 'q_test', 0, 'processing', 1)",
        (key,),
    )
    db.execute(
        "UPDATE workers.processed_jobs SET status = 'completed', completed_at = clock_timestamp()"
        " WHERE job_key = %s",
        (key,),
    )


def _score(db: Conn, judgment_id: int, key: str) -> None:
    db.execute(
        "INSERT INTO dragonfly.collectability_scores (judgment_id, score, tier, reason, job_key)"
        " VALUES (%s, 50, 'B', 'test', %s) ON CONFLICT (judgment_id) DO UPDATE"
        " SET job_key = EXCLUDED.job_key, scored_at = clock_timestamp()",
        (judgment_id, key),
    )


def _recommend(db: Conn, case_id: int, key: str) -> None:
    db.execute(
        "INSERT INTO dragonfly.enforcement_events (case_id, event_type, details, job_key)"
        " VALUES (%s, 'recommendation', '{}', %s)",
        (case_id, key),
    )


def play_correct_run(db: Conn, plan: Plan) -> list[Call]:
    """Leave the state a correct run leaves: every job done once, the poison dead-lettered;
    return the receiver's calls (each delivery accepted before its key was completed)."""
    calls = [
        Call(key=key, path="/hooks/dragonfly", status=200, at=time.time())
        for key in sorted(plan.receiver_keys | {k for k, q in plan.hung.items() if q == "q_chaos_external"})
    ]
    for key, judgment_id in plan.scores.items():
        _score(db, judgment_id, key)
    for key, case_id in plan.escalations.items():
        _recommend(db, case_id, key)
        enqueue(
            db,
            "q_outbox_processor",
            build_envelope(
                entity_type="notification",
                entity_id=str(case_id),
                org_id=ORG_ID,
                idempotency_key=notify_key(key),
                payload={"channel": "webhook"},
            ),
        )
    for key in plan.chaos_jobs:
        db.execute("INSERT INTO chaos.worker_effects (job_key, attempt) VALUES (%s, 1)", (key,))
    for key in sorted(plan.expected_keys):
        _complete(db, key)
    for item in plan.poison:
        kind = "Test"
        if item.key in plan.killers:
            kind = "AttemptsExhausted"
        elif item.key in plan.hung:
            kind = "JobTimedOut"
        db.execute(
            "INSERT INTO workers.dead_letters (queue_name, msg_id, job_key, message, error,"
            " error_type) VALUES (%s, 0, %s, %s::jsonb, 'poison', %s)",
            (item.queue, item.key, item.text, kind),
        )
        if item.key:
            db.execute(
                "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status)"
                " VALUES (%s, %s, 0, 'dead')",
                (item.key, item.queue),
            )
    db.execute("SELECT pgmq.purge_queue('q_outbox_processor')")
    return calls


def keys(section: dict[str, Any]) -> set[str]:
    return {example["key"] for example in section["examples"]}


def _lines_naming(logs: Path, key: str | None, most: int = 60) -> str:
    """The replicas' log lines that name ``key`` (the job waiting longest), oldest replica
    first, each after its file's name; at most ``most`` of them."""
    if not key:
        return ""
    needle = json.dumps(key)
    found = [
        f"{path.name}: {line}"
        for path in sorted(logs.glob("*.log"), key=lambda p: p.stat().st_mtime)
        for line in path.read_text(errors="replace").splitlines()
        if needle in line
    ]
    return f"\nlog lines naming {key} ({len(found)}, at most {most} shown):\n" + "\n".join(found[:most])


def test_the_checks_pass_a_correct_run(audited: Conn) -> None:
    plan = _small_plan(audited)
    calls = play_correct_run(audited, plan)
    found = check_effects(audited, plan, calls)
    assert found["violations"] == []
    assert found["jobs"]["completed"] == found["jobs"]["expected"] == len(plan.expected_keys)
    assert found["dead_letters"]["matched"] == found["dead_letters"]["total"] == len(plan.poison)
    hung = check_hung(audited, plan, calls, [], [], max_attempts=5)
    assert hung["violations"] == [] and hung["count"] == 4
    assert hung["dead_letters"] == {"JobTimedOut": 4}


def test_the_hung_job_check_reports_a_hung_job_that_committed_went_unsent_or_died_otherwise(
    audited: Conn,
) -> None:
    plan = _small_plan(audited)
    calls = play_correct_run(audited, plan)
    transactional = sorted(k for k, q in plan.hung.items() if q == "q_chaos_worker")
    external = sorted(k for k, q in plan.hung.items() if q == "q_chaos_external")
    # A transactional hung job whose effect committed; an external one that never reached
    # the receiver; one dead-lettered AttemptsExhausted with no attempt left unrecorded.
    audited.execute("INSERT INTO chaos.worker_effects (job_key, attempt) VALUES (%s, 1)", (transactional[0],))
    calls = [c for c in calls if c.key != external[0]]
    audited.execute(
        "UPDATE workers.dead_letters SET error_type = 'AttemptsExhausted' WHERE job_key = ANY(%s)",
        ([transactional[1], external[1]],),
    )
    # The last attempt of one of those hung, and no record of it dead-lettered the job: its
    # worker was killed meanwhile, so AttemptsExhausted is right for it.
    hangs = [{"job_key": external[1], "attempt": 3, "how": "recv"}]
    timeouts = [{"job_key": external[1], "attempt": 2, "interrupted": False, "outcome": "attempt 2 failed"}]

    found = check_hung(audited, plan, calls, hangs, timeouts, max_attempts=3)

    assert sorted(found["problems"]) == [
        f"{external[0]}: never reached the receiver",
        f"{transactional[0]}: its effect committed 1 times",
        f"{transactional[1]}: dead-lettered AttemptsExhausted",
    ]
    assert found["violations"] == ["3 hung job problem(s)"]
    assert found["timed_out"] == {"interrupted": 0, "not_interrupted": 1}


def test_the_stall_check_reports_a_job_held_up_and_forgives_retry_delays(audited: Conn) -> None:
    plan = _small_plan(audited)
    play_correct_run(audited, plan)
    audited.execute(
        "INSERT INTO chaos.waves (wave, at) VALUES (0, clock_timestamp()),"
        " (1, clock_timestamp() - interval '100 seconds')"
    )
    early = {i.key for i in plan.waves[0] if i.key}
    held = sorted({i.key for i in plan.waves[1] if i.key} & plan.expected_keys - early)
    assert held

    found = check_stalls(audited, plan, [], outage=(None, None), limit_s=15)
    assert found["over_limit"] == len(held) and found["longest_s"] >= 99
    assert found["violations"] and {e["key"] for e in found["examples"]} <= set(held)

    retries = [{"job_key": key, "retry_in_s": 100} for key in held]
    assert check_stalls(audited, plan, retries, outage=(None, None), limit_s=15)["violations"] == []

    # Where jobs hang, a queue has its own limit; the others keep theirs.
    queues = {i.key: i.queue for i in plan.waves[1] if i.key in held}
    chaos = {k for k, q in queues.items() if q == "q_chaos_worker"}
    assert chaos and chaos != set(held)
    found = check_stalls(audited, plan, [], outage=(None, None), limit_s=15, limits={"q_chaos_worker": 120})
    assert found["over_limit"] == len(set(held) - chaos)
    assert {e["key"] for e in found["examples"]} <= set(held) - chaos
    assert found["beside_hung"]["limit_s"] == 120 and found["beside_hung"]["key"] in chaos


def test_the_checks_report_a_planted_duplicate_of_each_kind(audited: Conn) -> None:
    plan = _small_plan(audited)
    calls = play_correct_run(audited, plan)
    (case_key, case_id), *_ = plan.escalations.items()
    (score_key, judgment_id), *_ = plan.scores.items()
    note = plan.notes[0]
    # A second recommendation event for one case; a score job whose claim let it run again
    # (its effect and its completion twice, as when the ledger is bypassed); a notification
    # the receiver accepted again after its key was completed.
    _recommend(audited, case_id, f"{case_key}:again")
    audited.execute(
        "UPDATE workers.processed_jobs SET status = 'processing' WHERE job_key = %s", (score_key,)
    )
    _score(audited, judgment_id, score_key)
    audited.execute("UPDATE workers.processed_jobs SET status = 'completed' WHERE job_key = %s", (score_key,))
    calls.append(Call(key=note, path="/hooks/dragonfly", status=200, at=time.time() + 1))

    found = check_effects(audited, plan, calls)

    assert keys(found["duplicates"]) == {case_key, score_key, note}
    assert found["duplicates"]["count"] == 3 and found["lost"]["count"] == 0
    reasons = {e["key"]: " ".join(e["why"]) for e in found["duplicates"]["examples"]}
    assert "2 recommendation events" in reasons[case_key]
    assert "score written 2 times" in reasons[score_key] and "completed 2 times" in reasons[score_key]
    assert "after it was completed" in reasons[note]
    assert any("more than once" in v for v in found["violations"])


def test_the_checks_report_lost_jobs_stuck_claims_and_unexpected_dead_letters(audited: Conn) -> None:
    plan = _small_plan(audited)
    calls = play_correct_run(audited, plan)
    (score_key, _), *_ = plan.scores.items()
    escalation_key = next(iter(plan.escalations))
    audited.execute("DELETE FROM workers.processed_jobs WHERE job_key = %s", (score_key,))
    audited.execute(
        "UPDATE workers.processed_jobs SET status = 'processing',"
        " lease_expires_at = clock_timestamp() - interval '1 minute' WHERE job_key = %s",
        (escalation_key,),
    )
    lost_delivery = plan.notes[-1]
    calls = [c for c in calls if c.key != lost_delivery]
    audited.execute(
        "INSERT INTO workers.dead_letters (queue_name, msg_id, job_key, message, error,"
        " error_type) VALUES ('q_outbox_processor', 0, 'note:1', '{}', 'boom', 'Test')"
    )

    found = check_effects(audited, plan, calls)

    assert keys(found["lost"]) == {score_key, escalation_key, lost_delivery}
    assert found["stuck_claims"]["examples"] == [escalation_key]
    assert found["dead_letters"]["unexpected_count"] == 1
    assert len(found["violations"]) == 3  # lost, dead letters, stuck claims


def _record(**fields: Any) -> ProcessRecord:
    values: dict[str, Any] = {
        "kind": "outbox_processor",
        "slot": 0,
        "pid": 4242,
        "worker_id": "w-1",
        "booted": True,
        "signal": None,
        "final": False,
        "exit_code": 0,
        "drain_s": None,
        "spawned_wall": 1000.0,
        "signalled_wall": None,
        "shutdown_logged": False,
        "crash": None,
        "outages": 0,
    }
    values.update(fields)
    return ProcessRecord(**values)


def test_the_process_checks_report_bad_exits_and_live_looking_heartbeats() -> None:
    now = 2000.0
    records = [
        _record(worker_id="ok-term", signal="SIGTERM", exit_code=0, drain_s=0.4, shutdown_logged=True),
        _record(worker_id="ok-kill", signal="SIGKILL", exit_code=-9, signalled_wall=1500.0),
        _record(worker_id="term-no-shutdown", signal="SIGTERM", exit_code=-15),
        _record(worker_id="kill-beating", signal="SIGKILL", exit_code=-9, signalled_wall=1990.0),
        _record(worker_id="crashed", exit_code=1, crash="boom"),
        # Ended by one of its own jobs (the chaos worker's killers), even while draining.
        _record(worker_id="killer-job", kind="chaos_worker", exit_code=137, job_exit=True),
        _record(
            worker_id="killer-in-drain", kind="chaos_worker", signal="SIGTERM", exit_code=137, job_exit=True
        ),
        # Killed before its first heartbeat reached the database: no row claims it is alive.
        _record(worker_id="kill-rowless", signal="SIGKILL", exit_code=-9, signalled_wall=1800.0),
        # Ended by a handler blocked past its deadline: a hung job's (in a batch), even
        # while draining; one of a job that does not hang is a problem.
        _record(worker_id="hung", kind="chaos_worker", exit_code=1, timed_out_keys=("chaos:1", "h:1")),
        _record(worker_id="hung-in-drain", signal="SIGTERM", exit_code=1, timed_out_keys=("h:2",)),
        _record(worker_id="not-hung", exit_code=1, crash="deadline", timed_out_keys=("note:1",)),
    ]
    heartbeats = [
        {"worker_id": "ok-kill", "pid": 1, "status": "RUNNING", "started": 1000.0, "beat": 1499.8},
        {"worker_id": "kill-beating", "pid": 2, "status": "RUNNING", "started": 1000.0, "beat": 1999.0},
    ]

    found = check_processes(records, heartbeats, now, hung={"h:1", "h:2"})

    by_worker: dict[str, list[str]] = {}
    for problem in found["problems"]:
        by_worker.setdefault(problem["worker_id"], []).append(problem["problem"])
    assert set(by_worker) == {"term-no-shutdown", "kill-beating", "crashed", "not-hung"}
    assert by_worker["not-hung"] == ["exited 1 at the deadline of jobs that do not hang: ['note:1']"]
    assert found["hung_exits"] == 2 and found["exit_codes"]["hung job"] == {"1": 3}
    assert any("exited -15 after SIGTERM" in p for p in by_worker["term-no-shutdown"])
    assert any("no WORKER_SHUTDOWN" in p for p in by_worker["term-no-shutdown"])
    assert any("advanced" in p for p in by_worker["kill-beating"])
    assert any("not recognisable as dead" in p for p in by_worker["kill-beating"])
    assert by_worker["crashed"] == ["exited 1 without being signalled: boom"]
    assert found["sigkilled"] == 3 and found["recognised_dead"] == 2
    assert found["sigkilled_without_heartbeat_row"] == 1
    assert found["drain"]["worst_s"] == 0.4
