"""The worker inspector against a real PostgreSQL, run as the operator runs it: a
``python -m tools.worker_inspector`` subprocess, judged by its output and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg.types.json import Jsonb

from backend.config import QUEUES
from backend.db import upkeep
from backend.db.migrate import apply_migrations
from tools.worker_inspector.queries import replay_dead_letter

ROOT = Path(__file__).resolve().parents[2]
Conn = psycopg.Connection[Any]


def inspector(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "RAILWAY_", "WORKER_"))}
    base |= {"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": url, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tools.worker_inspector", *args],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def report(url: str, *args: str) -> tuple[int, dict[str, Any]]:
    done = inspector(url, "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def add_worker(db: Conn, worker_id: str, queue: str, status: str, age_s: float, **extra: Any) -> None:
    db.execute(
        "INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname,"
        " pid, version, git_sha, started_at, last_heartbeat_at, stopped_at, jobs_processed,"
        " jobs_failed, rss_bytes, metadata)"
        " VALUES (%(id)s, %(q)s, %(q)s, %(status)s, 'host-1', 42, '0.1.0', %(sha)s,"
        " now() - make_interval(secs => %(age)s + 60), now() - make_interval(secs => %(age)s),"
        " CASE WHEN %(status)s IN ('STOPPED', 'CRASHED')"
        "   THEN now() - make_interval(secs => %(age)s) END,"
        " %(done)s, %(failed)s, %(rss)s, %(meta)s)",
        {
            "id": worker_id,
            "q": queue,
            "status": status,
            "age": age_s,
            "sha": extra.get("git_sha"),
            "done": extra.get("done", 0),
            "failed": extra.get("failed", 0),
            "rss": extra.get("rss"),
            "meta": Jsonb(extra.get("metadata", {})),
        },
    )


def send(db: Conn, queue: str, body: Any, delay: int = 0) -> int:
    row = db.execute("SELECT pgmq.send(%s, %s, %s::integer) AS id", (queue, Jsonb(body), delay)).fetchone()
    assert row is not None
    return int(row["id"])


def add_claim(db: Conn, key: str, status: str, lease_s: float | None, attempts: int = 1) -> None:
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts,"
        " worker_id, lease_expires_at)"
        " VALUES (%s, 'q_collectability', 1, %s, %s, 'w-gone',"
        " now() + make_interval(secs => %s))",
        (key, status, attempts, lease_s),
    )


def add_dead_letter(db: Conn, queue: str, key: str | None, body: Any) -> int:
    row = db.execute(
        "INSERT INTO workers.dead_letters (queue_name, msg_id, job_key, message, error,"
        " error_type, attempts, worker_id) VALUES (%s, 7, %s, %s, 'boom', 'RuntimeError', 5,"
        " 'w-1') RETURNING id",
        (queue, key, Jsonb(body)),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def envelope(key: str) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "entity_type": "judgment",
        "entity_id": "42",
        "org_id": "org-1",
        "payload": {"n": 1},
    }


def queue_bodies(db: Conn, queue: str) -> list[Any]:
    return [r["message"] for r in db.execute(f"SELECT message FROM pgmq.q_{queue} ORDER BY msg_id")]


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["worker_id"]: w for w in doc["workers"]}


def codes(findings: list[dict[str, Any]]) -> set[tuple[str, str | None]]:
    return {(f["code"], f["subject"]) for f in findings}


def column(lines: list[str], header: str, name: str) -> str:
    """The cell under ``name`` in the row starting with ``header``'s table, by offset."""
    head = next(i for i, line in enumerate(lines) if line.startswith("NAME "))
    start = lines[head].index(name)
    row = next(line for line in lines[head + 1 :] if header in line)
    return row[start:].split("  ")[0]


@pytest.fixture(autouse=True)
def empty_queues(db: Conn) -> None:
    """Queues other tests create (beyond the three of the workers) start empty too."""
    for row in db.execute("SELECT queue_name FROM pgmq.list_queues()").fetchall():
        db.execute("SELECT pgmq.purge_queue(%s)", (row["queue_name"],))


# --- the report ---------------------------------------------------------------------------


def test_healthy_database_exits_0_and_hides_old_history(db: Conn, clean_db: str) -> None:
    for queue in ("q_collectability", "q_escalation", "q_outbox_processor"):
        add_worker(db, f"alive-{queue}", queue, "RUNNING", 5, done=12, failed=1)
    add_worker(db, "stopped-recent", "q_escalation", "STOPPED", 3600)
    add_worker(db, "stopped-old", "q_escalation", "STOPPED", 3 * 86400)
    send(db, "q_collectability", envelope("visible"))
    send(db, "q_collectability", envelope("delayed"), delay=300)
    send(db, "q_collectability", envelope("in-flight"))
    db.execute("SELECT * FROM pgmq.read('q_collectability', 300, 1)")  # the first message

    text = inspector(clean_db)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "worker inspector: HEALTHY"
    assert "4 shown, 1 hidden" in text.stdout
    assert column(lines, "alive-q_escalation", "VERDICT") == "alive"
    assert column(lines, "stopped-recent", "VERDICT") == "stopped"
    assert "stopped-old" not in text.stdout
    assert text.stderr == ""

    code, doc = report(clean_db)
    assert (code, doc["verdict"], doc["reasons"]) == (0, "healthy", [])
    assert set(by_id(doc)) == {
        "alive-q_collectability",
        "alive-q_escalation",
        "alive-q_outbox_processor",
        "stopped-recent",
    }
    assert doc["worker_summary"] == {
        "total": 5,
        "shown": 4,
        "hidden": 1,
        "by_verdict": {"dead": 0, "frozen": 0, "stale": 0, "alive": 3, "crashed": 0, "stopped": 2},
    }
    queue = next(q for q in doc["queues"] if q["queue_name"] == "q_collectability")
    assert queue | {"oldest_age_s": 0, "oldest_enqueued_at": ""} == {
        "queue_name": "q_collectability",
        "depth": 3,
        "visible": 1,
        "in_flight": 1,
        "delayed": 1,
        "oldest_age_s": 0,
        "oldest_enqueued_at": "",
        "dead_letters": 0,
        "workers_alive": 1,
    }
    assert 0 <= queue["oldest_age_s"] < 60
    assert doc["stuck_claims"] == {"count": 0, "items": []}
    assert doc["dead_letters"] == {"count": 0, "queues": []}

    _, everything = report(clean_db, "--all")
    assert "stopped-old" in by_id(everything)
    assert everything["worker_summary"]["hidden"] == 0


def test_every_worker_verdict_and_a_killed_worker_is_unhealthy(db: Conn, clean_db: str) -> None:
    add_worker(
        db,
        "w-alive",
        "q_collectability",
        "RUNNING",
        5,
        git_sha="abcdef0123456789",
        rss=100 * 1048576,
        metadata={"RAILWAY_REPLICA_ID": "replica-7"},
        done=3,
    )
    add_worker(db, "w-booting", "q_collectability", "BOOTING", 1)
    add_worker(db, "w-stale", "q_collectability", "RUNNING", 90)
    # On a replica of its own: no later instance of it has booted since.
    add_worker(
        db, "w-killed", "q_collectability", "RUNNING", 600, metadata={"RAILWAY_REPLICA_ID": "replica-9"}
    )
    add_worker(db, "w-stopped", "q_collectability", "STOPPED", 120)
    add_worker(db, "w-crashed", "q_collectability", "CRASHED", 120)

    code, doc = report(clean_db)
    workers = by_id(doc)
    assert {k: w["verdict"] for k, w in workers.items()} == {
        "w-alive": "alive",
        "w-booting": "alive",
        "w-stale": "stale",
        "w-killed": "dead",
        "w-stopped": "stopped",
        "w-crashed": "crashed",
    }
    alive = workers["w-alive"]
    assert (
        alive["git_sha"],
        alive["rss_mb"],
        alive["replica_id"],
        alive["jobs_processed"],
        alive["version"],
        alive["status"],
    ) == ("abcdef0", 100.0, "replica-7", 3, "0.1.0", "RUNNING")
    assert 595 <= workers["w-killed"]["heartbeat_age_s"] < 700
    assert "OOM kill or SIGKILL" in workers["w-killed"]["note"]
    assert code == 1 and doc["verdict"] == "unhealthy"
    assert codes(doc["reasons"]) == {("dead_worker", "w-killed")}
    assert codes(doc["warnings"]) == {("stale_worker", "w-stale"), ("crashed_workers", "q_collectability")}

    text = inspector(clean_db)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert lines[0] == "worker inspector: UNHEALTHY"
    assert column(lines, "w-killed", "VERDICT") == "dead"
    assert column(lines, "w-killed", "STATUS") == "RUNNING"
    assert column(lines, "w-alive", "RSS MB").strip() == "100.0"
    assert any("w-killed is dead" in line and "OOM kill or SIGKILL" in line for line in lines)

    # Thresholds are the operator's: with a longer patience nothing is dead.
    code, doc = report(clean_db, "--stale-after", "5m", "--dead-after", "1h")
    assert code == 0, doc["reasons"]
    assert by_id(doc)["w-killed"]["verdict"] == "stale"
    assert by_id(doc)["w-stale"]["verdict"] == "alive"


def test_sessions_tell_dead_from_late_only_where_they_carry_the_worker_id(db: Conn, clean_db: str) -> None:
    """Two heartbeat intervals late and no session under its id: dead where the worker's
    sessions are named by its id; behind a pooler that names them itself only the
    heartbeat's age counts, and it is not old enough for stale yet."""
    beat = {"heartbeat_interval_s": 5, "pooled": False}
    add_worker(db, "w-named", "q_collectability", "RUNNING", 20, metadata={**beat, "named_sessions": True})
    add_worker(db, "w-unnamed", "q_collectability", "RUNNING", 20, metadata={**beat, "named_sessions": False})
    add_worker(db, "w-older", "q_collectability", "RUNNING", 20, metadata=beat)  # before named_sessions
    _, doc = report(clean_db)
    assert {k: w["verdict"] for k, w in by_id(doc).items()} == {
        "w-named": "dead",
        "w-unnamed": "alive",
        "w-older": "dead",
    }


def test_a_worker_dead_before_the_window_is_hidden_and_only_a_warning(db: Conn, clean_db: str) -> None:
    add_worker(db, "w-long-gone", "q_escalation", "RUNNING", 2 * 86400)
    code, doc = report(clean_db)
    assert code == 0
    assert doc["workers"] == [] and doc["worker_summary"]["hidden"] == 1
    assert codes(doc["warnings"]) == {("old_dead_workers", None)}

    code, doc = report(clean_db, "--since", "3d")
    assert code == 1
    assert codes(doc["reasons"]) == {("dead_worker", "w-long-gone")}


def test_stuck_claims_are_counted_listed_and_unhealthy(db: Conn, clean_db: str) -> None:
    add_claim(db, "stuck-1", "processing", -300, attempts=2)
    add_claim(db, "stuck-2", "processing", -200)
    add_claim(db, "stuck-3", "processing", -100)
    add_claim(db, "live", "processing", 60)
    add_claim(db, "done", "completed", -1000)

    code, doc = report(clean_db, "--stuck-limit", "2")
    assert code == 1
    assert codes(doc["reasons"]) == {("stuck_claims", None)}
    stuck = doc["stuck_claims"]
    assert stuck["count"] == 3
    assert [s["job_key"] for s in stuck["items"]] == ["stuck-1", "stuck-2"]
    first = stuck["items"][0]
    assert (first["queue_name"], first["worker_id"], first["attempts"]) == ("q_collectability", "w-gone", 2)
    assert 295 <= first["age_s"] < 400

    text = inspector(clean_db)
    assert text.returncode == 1
    assert "STUCK CLAIMS  3" in text.stdout
    assert "3 stuck claim(s)" in text.stdout


def test_dead_letters_are_counted_per_queue_and_unhealthy(db: Conn, clean_db: str) -> None:
    add_dead_letter(db, "q_escalation", "k-1", envelope("k-1"))
    add_dead_letter(db, "q_escalation", None, "not an envelope")
    replayed = add_dead_letter(db, "q_collectability", "k-2", envelope("k-2"))
    db.execute("UPDATE workers.dead_letters SET replayed_at = now() WHERE id = %s", (replayed,))

    code, doc = report(clean_db)
    assert code == 1
    assert codes(doc["reasons"]) == {("dead_letters", "q_escalation")}
    assert doc["dead_letters"]["count"] == 2
    assert [(g["queue_name"], g["count"]) for g in doc["dead_letters"]["queues"]] == [("q_escalation", 2)]
    queues = {q["queue_name"]: q["dead_letters"] for q in doc["queues"]}
    assert {q: queues[q] for q in QUEUES} == {
        "q_collectability": 0,
        "q_escalation": 2,
        "q_outbox_processor": 0,
    }

    text = inspector(clean_db)
    assert "DEAD LETTERS  2 unreplayed" in text.stdout
    assert "queue q_escalation has 2 unreplayed dead letter(s)" in text.stdout


def test_a_backlog_without_an_alive_worker_or_too_old_is_unhealthy(db: Conn, clean_db: str) -> None:
    add_worker(db, "w-dead", "q_outbox_processor", "STOPPED", 30)
    send(db, "q_outbox_processor", envelope("waiting"))
    code, doc = report(clean_db)
    assert code == 1
    assert codes(doc["reasons"]) == {("queue_unserved", "q_outbox_processor")}

    add_worker(db, "w-alive", "q_outbox_processor", "RUNNING", 1)
    db.execute("UPDATE pgmq.q_q_outbox_processor SET enqueued_at = now() - interval '1 hour'")
    code, doc = report(clean_db)
    assert code == 1
    assert codes(doc["reasons"]) == {("queue_backlog_old", "q_outbox_processor")}
    assert report(clean_db, "--max-age", "2h")[0] == 0


# --- failures: one line on stderr, exit 2 -------------------------------------------------


def test_an_unreachable_database_is_one_line_without_the_password(clean_db: str) -> None:
    done = inspector("postgresql://u:secretpw@127.0.0.1:1/x")
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("worker_inspector: cannot connect to postgresql://u:***@127.0.0.1:1/x: ")
    assert "refused" in done.stderr.lower()
    assert "secretpw" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus"],
        ["--since", "forever"],
        ["dead-letters"],
        ["dead-letters", "replay"],
        ["dead-letters", "replay", "--queue", "q_escalation"],
        ["--stale-after", "5m", "--dead-after", "1m"],
    ],
)
def test_bad_usage_exits_2_with_the_usage(clean_db: str, args: list[str]) -> None:
    done = inspector(clean_db, *args)
    assert done.returncode == 2
    assert "usage:" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_bad_configuration_exits_2_in_one_line(clean_db: str) -> None:
    done = inspector(clean_db, env={"SUPABASE_MODE": "staging"})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "worker_inspector: configuration error: SUPABASE_MODE: unknown mode 'staging'; use dev or prod"
    ]


def test_a_database_without_the_schema_or_a_queue_says_which_command_to_run(db: Conn, clean_db: str) -> None:
    db.execute("DROP DATABASE IF EXISTS inspector_empty")
    db.execute("CREATE DATABASE inspector_empty")
    try:
        url = urlunsplit(urlsplit(clean_db)._replace(path="/inspector_empty"))
        bare = inspector(url)
        with psycopg.connect(url, autocommit=True) as other:
            apply_migrations(other, queues=("q_collectability",))
        code, doc = report(url)
    finally:
        db.execute("DROP DATABASE inspector_empty WITH (FORCE)")
    assert bare.returncode == 2
    assert len(bare.stderr.splitlines()) == 1
    assert "run python -m backend.db.migrate" in bare.stderr
    assert "Traceback" not in bare.stderr
    assert code == 1
    assert codes(doc["reasons"]) == {
        ("queue_missing", "q_escalation"),
        ("queue_missing", "q_outbox_processor"),
    }


# --- dead letters: list and replay --------------------------------------------------------


def test_dead_letters_list_shows_unreplayed_letters_newest_first(db: Conn, clean_db: str) -> None:
    first = add_dead_letter(db, "q_escalation", "k-1", envelope("k-1"))
    second = add_dead_letter(db, "q_collectability", "k-2", envelope("k-2"))
    third = add_dead_letter(db, "q_escalation", None, [1, 2])
    db.execute("UPDATE workers.dead_letters SET replayed_at = now() WHERE id = %s", (second,))

    done = inspector(clean_db, "dead-letters", "list")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0] == "DEAD LETTERS  2 of 2 shown, newest first"
    assert lines[1].split()[:4] == ["ID", "QUEUE", "MSG", "ID"]
    assert [line.split()[0] for line in lines[2:]] == [str(third), str(first)]

    done = inspector(clean_db, "dead-letters", "list", "--queue", "q_escalation", "--limit", "1", "--json")
    doc = json.loads(done.stdout)
    assert doc["count"] == 2
    assert [(i["id"], i["job_key"], i["message"]) for i in doc["items"]] == [(third, None, [1, 2])]

    doc = json.loads(inspector(clean_db, "dead-letters", "list", "--include-replayed", "--json").stdout)
    assert [i["id"] for i in doc["items"]] == [third, second, first]
    assert doc["items"][1]["replayed_at"] is not None


def test_replay_resends_the_message_marks_it_and_resets_the_ledger(db: Conn, clean_db: str) -> None:
    body = envelope("k-dead")
    letter = add_dead_letter(db, "q_escalation", "k-dead", body)
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status,"
        " attempts, last_error) VALUES ('k-dead', 'q_escalation', 7, 'dead', 5, 'boom')"
    )

    done = inspector(clean_db, "dead-letters", "replay", "--id", str(letter))
    assert done.returncode == 0, done.stderr
    assert queue_bodies(db, "q_escalation") == [body]
    msg_id = db.execute("SELECT msg_id FROM pgmq.q_q_escalation").fetchone()["msg_id"]
    assert f"replayed dead letter {letter} (queue q_escalation, job k-dead) as msg_id {msg_id}" in done.stdout
    row = db.execute("SELECT replayed_at FROM workers.dead_letters WHERE id = %s", (letter,)).fetchone()
    assert row["replayed_at"] is not None
    ledger = db.execute(
        "SELECT status, attempts FROM workers.processed_jobs WHERE job_key = 'k-dead'"
    ).fetchone()
    assert ledger == {"status": "failed", "attempts": 0}

    again = inspector(clean_db, "dead-letters", "replay", "--id", str(letter), "--json")
    assert again.returncode == 0
    doc = json.loads(again.stdout)
    assert (doc["replayed"], [s["id"] for s in doc["skipped"]]) == ([], [letter])
    assert queue_bodies(db, "q_escalation") == [body]
    assert report(clean_db)[1]["dead_letters"]["count"] == 0

    missing = inspector(clean_db, "dead-letters", "replay", "--id", "999999")
    assert missing.returncode == 1
    assert "no such dead letter" in missing.stdout


def test_replay_a_whole_queue_including_an_unreadable_envelope(db: Conn, clean_db: str) -> None:
    good = add_dead_letter(db, "q_collectability", "k-1", envelope("k-1"))
    unreadable = add_dead_letter(db, "q_collectability", None, "garbage")
    other_queue = add_dead_letter(db, "q_escalation", "k-3", envelope("k-3"))
    done_key = add_dead_letter(db, "q_collectability", "k-done", envelope("k-done"))
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status,"
        " attempts) VALUES ('k-done', 'q_collectability', 9, 'completed', 1)"
    )

    dry = inspector(clean_db, "dead-letters", "replay", "--queue", "q_collectability", "--all", "--dry-run")
    assert dry.returncode == 0 and "would replay 3" in dry.stdout
    assert queue_bodies(db, "q_collectability") == []

    done = inspector(clean_db, "dead-letters", "replay", "--queue", "q_collectability", "--all", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [r["dead_letter_id"] for r in doc["replayed"]] == [good, unreadable, done_key]
    assert queue_bodies(db, "q_collectability") == [envelope("k-1"), "garbage", envelope("k-done")]
    assert queue_bodies(db, "q_escalation") == []
    # A completed key stays completed: the worker deletes the message without a rerun.
    ledger = db.execute("SELECT status FROM workers.processed_jobs WHERE job_key = 'k-done'")
    assert ledger.fetchone() == {"status": "completed"}
    pending = db.execute("SELECT id FROM workers.dead_letters WHERE replayed_at IS NULL")
    assert [r["id"] for r in pending] == [other_queue]


def test_replay_dead_letter_function_sends_once(db: Conn) -> None:
    letter = add_dead_letter(db, "q_outbox_processor", "k-1", envelope("k-1"))
    msg_id = replay_dead_letter(db, letter)
    assert msg_id is not None
    assert [r["msg_id"] for r in db.execute("SELECT msg_id FROM pgmq.q_q_outbox_processor")] == [msg_id]
    assert replay_dead_letter(db, letter) is None
    assert replay_dead_letter(db, letter + 1000) is None
    assert len(queue_bodies(db, "q_outbox_processor")) == 1


def test_replay_to_a_queue_that_no_longer_exists_fails_and_changes_nothing(db: Conn, clean_db: str) -> None:
    letter = add_dead_letter(db, "q_gone", "k-1", envelope("k-1"))
    done = inspector(clean_db, "dead-letters", "replay", "--id", str(letter))
    assert done.returncode == 1
    assert f"FAILED dead letter {letter}:" in done.stdout and "q_gone" in done.stdout
    row = db.execute("SELECT replayed_at FROM workers.dead_letters WHERE id = %s", (letter,)).fetchone()
    assert row == {"replayed_at": None}


def test_a_bad_tunable_is_a_warning_for_the_inspector_not_a_refusal(clean_db: str) -> None:
    done = inspector(clean_db, "--json", env={"WORKER_BATCH_SIZE": "abc"})
    assert done.returncode in (0, 1), done.stderr
    assert json.loads(done.stdout)["verdict"] in ("healthy", "unhealthy")
    assert done.stderr.splitlines() == [
        "worker_inspector: warning: WORKER_BATCH_SIZE: 'abc' is not a whole number;"
        " ignored, using the default 100"
    ]


def test_three_unclean_ends_in_ten_minutes_are_a_crash_loop_even_after_a_clean_boot(
    db: Conn, clean_db: str
) -> None:
    for i, age in enumerate((30, 90, 150)):
        error = {
            "error": f"WORKER_BATCH_SIZE: 'abc' is not a whole number ({i})",
            "error_type": "ConfigError",
        }
        add_worker(db, f"w-crash-{i}", "q_collectability", "CRASHED", age, metadata=error)
    add_worker(db, "w-old-crash", "q_escalation", "CRASHED", 2000)  # outside the window
    code, doc = report(clean_db)
    assert code == 1
    loop = [f for f in doc["reasons"] if f["code"] == "crash_loop"]
    assert [f["subject"] for f in loop] == ["q_collectability"]
    assert "3 unclean ends within 10m (3 crashed)" in loop[0]["message"]
    assert "ConfigError: WORKER_BATCH_SIZE: 'abc' is not a whole number (0)" in loop[0]["message"]

    # Railway restarts a replica seconds after each exit: a boot that gets through does not
    # clear the loop, ten minutes without an unclean end do.
    add_worker(db, "w-fixed", "q_collectability", "RUNNING", 1)  # booted after them, same host
    code, doc = report(clean_db)
    assert code == 1 and "crash_loop" in {f["code"] for f in doc["reasons"]}


def test_discarded_dead_letters_stop_weighing_on_the_verdict_and_keep_their_body(
    db: Conn, clean_db: str
) -> None:
    first = add_dead_letter(db, "q_collectability", "bad-1", envelope("bad-1"))
    add_dead_letter(db, "q_collectability", "bad-2", envelope("bad-2"))
    add_dead_letter(db, "q_collectability", None, "not an envelope")
    assert report(clean_db)[0] == 1

    one = inspector(clean_db, "dead-letters", "discard", "--id", str(first), "--reason", "bad enqueue")
    assert one.returncode == 0 and f"discarded dead letter {first}" in one.stdout, one.stderr
    code, doc = report(clean_db)
    assert code == 1 and "2 unreplayed" in next(f["message"] for f in doc["reasons"])

    needs_all = inspector(clean_db, "dead-letters", "discard", "--queue", "q_collectability")
    assert needs_all.returncode == 2 and "--all" in needs_all.stderr
    bulk = inspector(clean_db, "dead-letters", "discard", "--queue", "q_collectability", "--all", "--json")
    assert bulk.returncode == 0
    assert len(json.loads(bulk.stdout)["discarded"]) == 2
    code, doc = report(clean_db)
    assert code == 0 and doc["verdict"] == "healthy"

    rows = db.execute("SELECT * FROM workers.dead_letters ORDER BY id").fetchall()
    assert all(r["discarded_at"] is not None for r in rows)
    assert rows[0]["discard_reason"] == "bad enqueue" and rows[0]["message"] == envelope("bad-1")
    assert rows[2]["message"] == "not an envelope" and rows[2]["error"] == "boom"

    again = inspector(clean_db, "dead-letters", "replay", "--id", str(first))
    assert (
        again.returncode == 0
        and "discarded at" in again.stdout
        and queue_bodies(db, "q_collectability") == []
    )
    listed = json.loads(inspector(clean_db, "dead-letters", "list", "--json").stdout)
    assert listed["count"] == 0
    assert (
        json.loads(inspector(clean_db, "dead-letters", "list", "--include-replayed", "--json").stdout)[
            "count"
        ]
        == 3
    )

    db.execute(
        "UPDATE workers.dead_letters SET discarded_at = now() - interval '8 days' WHERE id = %s", (first,)
    )
    assert upkeep.prune(db, ledger_days=7, heartbeat_days=7) == upkeep.Pruned(dead_letter_rows=1)
