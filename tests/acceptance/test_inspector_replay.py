"""Replay from the inspector: a dead-lettered job runs again and completes once."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from backend.domain.seed import seed_demo
from backend.enqueue import build_envelope, enqueue
from scripts.harness.process import WorkerProcess
from tests.helpers import run_inspector, wait_until

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
Conn = psycopg.Connection[Any]


def inspector(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_inspector(url, *args, timeout=30)


def test_a_dead_letter_replayed_from_the_inspector_completes_once(
    spawn: Spawn, db: Conn, clean_db: str
) -> None:
    seeded = seed_demo(db, judgments=1, cases=0)
    missing = seeded["judgment_ids"][0] + 1000
    enqueue(
        db,
        "q_collectability",
        build_envelope(
            entity_type="judgment",
            entity_id=str(missing),
            org_id=seeded["org_id"],  # the judgment, once it exists, is the seeded org's
            idempotency_key="score:late",
        ),
    )
    worker = spawn("backend.workers.collectability")
    wait_until(lambda: db.execute("SELECT count(*) AS n FROM workers.dead_letters").fetchone()["n"])
    listed = json.loads(inspector(clean_db, "dead-letters", "list", "--json").stdout)
    letters = listed["items"]
    assert [d["job_key"] for d in letters] == ["score:late"]
    assert inspector(clean_db).returncode == 1, "a dead letter makes the verdict unhealthy"

    # The fault is removed: the judgment now exists.
    db.execute(
        "INSERT INTO dragonfly.judgments (id, org_id, plaintiff_id, debtor_id, amount,"
        " judgment_date) OVERRIDING SYSTEM VALUE SELECT %s, org_id, plaintiff_id,"
        " debtor_id, 12000, current_date - 400 FROM dragonfly.judgments LIMIT 1",
        (missing,),
    )
    replay = inspector(clean_db, "dead-letters", "replay", "--id", str(letters[0]["id"]))
    assert replay.returncode == 0, replay.stderr
    wait_until(
        lambda: (
            db.execute("SELECT status FROM workers.processed_jobs WHERE job_key = 'score:late'").fetchone()[
                "status"
            ]
            == "completed"
        )
    )
    again = inspector(clean_db, "dead-letters", "replay", "--id", str(letters[0]["id"]))
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0
    assert "already replayed" in again.stdout, again.stdout + again.stderr
    scores = db.execute(
        "SELECT job_key FROM dragonfly.collectability_scores WHERE judgment_id = %s", (missing,)
    ).fetchall()
    assert [s["job_key"] for s in scores] == ["score:late"]
    assert db.execute("SELECT count(*) AS n FROM pgmq.q_q_collectability").fetchone()["n"] == 0


def test_a_dead_letter_keeps_and_replays_the_body_exactly_as_sent(
    spawn: Spawn, db: Conn, clean_db: str
) -> None:
    """Fields the envelope does not know (top level and payload) survive dead-lettering and
    replay: the letter and the re-sent message are the original JSON."""
    seeded = seed_demo(db, judgments=1, cases=0)
    missing = seeded["judgment_ids"][0] + 1000
    body = {
        **build_envelope(
            entity_type="judgment",
            entity_id=str(missing),
            org_id="org-test",
            idempotency_key="score:extra",
            payload={"source": "import", "n": [1, 2.5]},
        ),
        "schema_version": 3,
        "source": {"system": "crm", "batch": None},
    }
    original = db.execute("SELECT %s::jsonb::text AS t", (json.dumps(body),)).fetchone()["t"]
    db.execute("SELECT pgmq.send('q_collectability', %s::jsonb)", (json.dumps(body),))
    worker = spawn("backend.workers.collectability")
    wait_until(lambda: db.execute("SELECT count(*) AS n FROM workers.dead_letters").fetchone()["n"])
    letter = db.execute("SELECT id, message::text AS t FROM workers.dead_letters").fetchone()
    assert letter["t"] == original
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0

    assert inspector(clean_db, "dead-letters", "replay", "--id", str(letter["id"])).returncode == 0
    resent = db.execute("SELECT message::text AS t FROM pgmq.q_q_collectability").fetchone()
    assert resent["t"] == original
