"""The three Dragonfly workers as real processes, their effects counted in the database and
at real local receivers."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from backend.domain.collectability import score_judgment
from backend.domain.seed import seed_demo
from backend.enqueue import build_envelope, enqueue, enqueue_many
from scripts.harness.process import WorkerProcess
from scripts.harness.receivers import HttpRecorder, Reply
from scripts.harness.smtp import SmtpRecorder
from tests.helpers import wait_until

pytestmark = pytest.mark.slow
Spawn = Callable[..., WorkerProcess]
Conn = psycopg.Connection[Any]


def count(db: Conn, sql: str, *args: Any) -> int:
    return int(next(iter(db.execute(sql, args).fetchone().values())))


def drained(db: Conn, queue: str) -> Callable[[], bool]:
    return lambda: count(db, f"SELECT count(*) FROM pgmq.q_{queue}") == 0


def stop(worker: WorkerProcess) -> None:
    worker.send(signal.SIGTERM)
    assert worker.wait_exit() == 0


def test_collectability_scores_every_seeded_judgment(spawn: Spawn, db: Conn) -> None:
    seeded = seed_demo(db, judgments=300, cases=0)
    enqueue_many(
        db,
        "q_collectability",
        [
            build_envelope(
                entity_type="judgment",
                entity_id=str(j),
                org_id=seeded["org_id"],
                idempotency_key=f"score:{j}",
            )
            for j in seeded["judgment_ids"]
        ],
    )
    enqueue(
        db,
        "q_collectability",
        build_envelope(
            entity_type="judgment", entity_id="999999", org_id="o", idempotency_key="score:missing"
        ),
    )
    worker = spawn("backend.workers.collectability")
    wait_until(drained(db, "q_collectability"), timeout=30)
    stop(worker)
    rows = db.execute(
        "SELECT j.id, j.amount, j.judgment_date, s.score, s.tier, s.reason,"
        " s.scored_at, s.job_key FROM dragonfly.judgments j"
        " JOIN dragonfly.collectability_scores s ON s.judgment_id = j.id"
    ).fetchall()
    assert len(rows) == 300
    today = datetime.now(UTC).date()
    for row in rows:
        expected = score_judgment(row["amount"], row["judgment_date"], today)
        assert (row["score"], row["tier"], row["reason"]) == (expected.score, expected.tier, expected.reason)
        assert row["scored_at"] is not None and row["job_key"] == f"score:{row['id']}"
    letter = db.execute("SELECT * FROM workers.dead_letters").fetchone()
    assert letter["job_key"] == "score:missing" and "not found" in letter["error"]


def test_escalation_records_a_recommendation_and_enqueues_its_notification(spawn: Spawn, db: Conn) -> None:
    seeded = seed_demo(db, judgments=40, cases=25)
    enqueue_many(
        db,
        "q_escalation",
        [
            build_envelope(
                entity_type="enforcement_case",
                entity_id=str(c),
                org_id=seeded["org_id"],
                idempotency_key=f"escalate:{c}",
            )
            for c in seeded["case_ids"]
        ],
    )
    worker = spawn("backend.workers.escalation")
    wait_until(drained(db, "q_escalation"), timeout=30)
    stop(worker)
    recs = db.execute(
        "SELECT case_id, details, job_key FROM dragonfly.enforcement_events"
        " WHERE event_type = 'recommendation'"
    ).fetchall()
    assert sorted(r["case_id"] for r in recs) == sorted(seeded["case_ids"])
    for rec in recs:
        assert rec["details"]["action"] in {"garnishment", "levy", "skiptrace_refresh", "attorney_review"}
        assert 0 < rec["details"]["confidence"] <= 1 and rec["details"]["reasons"]
    keys = {
        r["message"]["idempotency_key"]
        for r in db.execute("SELECT message FROM pgmq.q_q_outbox_processor").fetchall()
    }
    assert keys == {f"escalate:{c}:notify" for c in seeded["case_ids"]}


def test_one_key_on_two_queues_is_two_jobs_each_run_once(spawn: Spawn, db: Conn) -> None:
    seeded = seed_demo(db, judgments=1, cases=1)
    key = "shared-key-1"
    for queue, entity_type, entity_id, module in (
        ("q_collectability", "judgment", seeded["judgment_ids"][0], "collectability"),
        ("q_escalation", "enforcement_case", seeded["case_ids"][0], "escalation"),
    ):
        envelope = build_envelope(
            entity_type=entity_type, entity_id=str(entity_id), org_id=seeded["org_id"], idempotency_key=key
        )
        enqueue(db, queue, envelope)
        worker = spawn(f"backend.workers.{module}")
        wait_until(drained(db, queue), timeout=30)
        stop(worker)
    ledger = db.execute(
        "SELECT queue_name, status, attempts FROM workers.processed_jobs WHERE job_key = %s ORDER BY 1",
        (key,),
    ).fetchall()
    assert [tuple(r.values()) for r in ledger] == [
        ("q_collectability", "completed", 1),
        ("q_escalation", "completed", 1),
    ]
    assert count(db, "SELECT count(*) FROM dragonfly.collectability_scores WHERE job_key = %s", key) == 1
    assert count(db, "SELECT count(*) FROM dragonfly.enforcement_events WHERE job_key = %s", key) == 1
    assert count(db, "SELECT count(*) FROM pgmq.q_q_outbox_processor") == 1
    assert count(db, "SELECT count(*) FROM workers.dead_letters") == 0


def outbox_env(http: HttpRecorder, smtp: SmtpRecorder, **extra: Any) -> dict[str, Any]:
    return {
        "OUTBOX_WEBHOOK_URL": http.url_for("/hooks/dragonfly"),
        "OUTBOX_SLACK_WEBHOOK_URL": http.url_for("/slack/T000/B000/secret"),
        "OUTBOX_SMTP_HOST": "127.0.0.1",
        "OUTBOX_SMTP_PORT": smtp.port,
        "OUTBOX_SMTP_TLS": "none",
        "OUTBOX_SMTP_FROM": "noreply@dragonfly.test",
        "OUTBOX_HTTP_TIMEOUT_S": 5,
        "WORKER_RETRY_BASE_S": 1,
        **extra,
    }


def note(key: str, channel: str, **extra: Any) -> dict[str, Any]:
    return build_envelope(
        entity_type="notification",
        entity_id=key,
        org_id="org-test",
        idempotency_key=key,
        payload={"channel": channel, "subject": f"re {key}", "body": f"body of {key}", **extra},
    )


def test_outbox_delivers_to_real_http_and_smtp_receivers(
    spawn: Spawn, db: Conn, http: HttpRecorder, smtp: SmtpRecorder
) -> None:
    enqueue_many(
        db,
        "q_outbox_processor",
        [
            note("n-webhook", "webhook"),
            note("n-slack", "slack"),
            note("n-email", "email", to="creditor@example.com"),
            note("n-discord", "discord"),
        ],
    )  # discord is not configured
    worker = spawn("backend.workers.outbox_processor", **outbox_env(http, smtp))
    wait_until(drained(db, "q_outbox_processor"), timeout=30)
    stop(worker)
    assert http.key_counts() == {"n-webhook": 1, "n-slack": 1}
    hook = next(r for r in http.requests if r.idempotency_key == "n-webhook")
    assert hook.path == "/hooks/dragonfly" and hook.json()["body"] == "body of n-webhook"
    assert [m.idempotency_key for m in smtp.messages] == ["n-email"]
    assert smtp.messages[0].message_id and "dragonfly.outbox" in smtp.messages[0].message_id
    done = {
        r["job_key"]: r["status"]
        for r in db.execute("SELECT job_key, status FROM workers.processed_jobs").fetchall()
    }
    assert done == {
        "n-webhook": "completed",
        "n-slack": "completed",
        "n-email": "completed",
        "n-discord": "dead",
    }
    letter = db.execute("SELECT * FROM workers.dead_letters").fetchone()
    assert letter["job_key"] == "n-discord" and "OUTBOX_DISCORD_WEBHOOK_URL" in letter["error"]
    assert letter["attempts"] == 1


def test_outbox_dead_letters_4xx_and_retries_5xx(
    spawn: Spawn, db: Conn, http: HttpRecorder, smtp: SmtpRecorder
) -> None:
    http.script(Reply(status=422), Reply(status=503), Reply(status=200))
    enqueue(db, "q_outbox_processor", note("n-rejected", "webhook"))
    worker = spawn("backend.workers.outbox_processor", **outbox_env(http, smtp))
    wait_until(lambda: count(db, "SELECT count(*) FROM workers.dead_letters") == 1, timeout=20)
    enqueue(db, "q_outbox_processor", note("n-flaky", "webhook"))
    wait_until(drained(db, "q_outbox_processor"), timeout=30)
    stop(worker)
    letter = db.execute("SELECT * FROM workers.dead_letters").fetchone()
    assert letter["job_key"] == "n-rejected" and "422" in letter["error"]
    row = db.execute("SELECT * FROM workers.processed_jobs WHERE job_key = 'n-flaky'").fetchone()
    assert row["status"] == "completed" and row["attempts"] == 2
    assert http.key_counts() == {"n-rejected": 1, "n-flaky": 2}
    failed = worker.named("JOB_FAILED")
    assert failed and failed[0]["job_key"] == "n-flaky" and failed[0]["retry_in_s"] >= 1


def test_outbox_redelivery_after_a_kill_reaches_the_receiver_with_the_same_key(
    spawn: Spawn, db: Conn, http: HttpRecorder, smtp: SmtpRecorder
) -> None:
    http.script(Reply(status=200, delay_s=30), Reply(status=200))
    enqueue(db, "q_outbox_processor", note("n-killed", "webhook"))
    env = outbox_env(http, smtp, WORKER_VISIBILITY_TIMEOUT_S=2, OUTBOX_HTTP_TIMEOUT_S=60)
    worker = spawn("backend.workers.outbox_processor", **env)
    http.wait_for_calls(1, timeout_s=20)  # the receiver has the call; no answer yet
    worker.proc.send_signal(signal.SIGKILL)
    assert worker.wait_exit() == -signal.SIGKILL
    again = spawn("backend.workers.outbox_processor", **env)
    wait_until(drained(db, "q_outbox_processor"), timeout=30)
    stop(again)
    assert http.total_calls == 2 and http.distinct_keys() == {"n-killed"}
    row = db.execute("SELECT * FROM workers.processed_jobs WHERE job_key = 'n-killed'").fetchone()
    assert row["status"] == "completed" and row["attempts"] == 2


def test_outbox_waits_what_a_429_s_retry_after_asks(
    spawn: Spawn, db: Conn, http: HttpRecorder, smtp: SmtpRecorder
) -> None:
    http.script(Reply(status=429, headers={"Retry-After": "3"}), Reply(status=200))
    enqueue(db, "q_outbox_processor", note("n-throttled", "webhook"))
    worker = spawn("backend.workers.outbox_processor", **outbox_env(http, smtp, WORKER_RETRY_BASE_S=0.1))
    wait_until(drained(db, "q_outbox_processor"), timeout=30)
    stop(worker)
    first, second = http.requests
    assert second.received_at - first.received_at >= 2.9  # the backoff alone would be 1 s
    failed = worker.named("JOB_FAILED")
    assert failed[0]["retry_after_s"] == 3.0 and failed[0]["retry_in_s"] == 3
    assert "a later attempt may succeed" in failed[0]["error"]


def test_outbox_rides_out_a_receiver_outage_without_a_dead_letter(
    spawn: Spawn, db: Conn, smtp: SmtpRecorder
) -> None:
    # The outbox's own defaults (10 attempts) with short waits: at least 9 s of waits in
    # all, against a receiver down for 6 s. At the defaults the same arithmetic gives at
    # least 607.5 s (tests/unit/test_retry_after.py).
    up_at = time.time() + 6.0  # the recorder stamps requests with time.time()

    def down_then_up(request: Any) -> Reply:
        return Reply(status=200) if time.time() >= up_at else Reply(status=503)

    with HttpRecorder(responder=down_then_up) as http:
        enqueue(db, "q_outbox_processor", note("n-outage", "webhook"))
        env = outbox_env(http, smtp, WORKER_RETRY_BASE_S=0.5, WORKER_RETRY_MAX_S=2)
        worker = spawn("backend.workers.outbox_processor", **env)
        wait_until(drained(db, "q_outbox_processor"), timeout=40)
        stop(worker)
        assert http.key_counts(accepted_only=True) == {"n-outage": 1}
        assert http.requests[-1].received_at >= up_at - 0.1
    assert count(db, "SELECT count(*) FROM workers.dead_letters") == 0
    row = db.execute(
        "SELECT status, attempts FROM workers.processed_jobs WHERE job_key = 'n-outage'"
    ).fetchone()
    assert row["status"] == "completed" and row["attempts"] >= 2


@pytest.mark.parametrize(
    ("module", "queue", "entity_type", "table"),
    [
        ("backend.workers.collectability", "q_collectability", "judgment", "dragonfly.collectability_scores"),
        ("backend.workers.escalation", "q_escalation", "enforcement_case", "dragonfly.enforcement_events"),
    ],
)
def test_a_job_for_another_organisation_s_entity_is_dead_lettered_and_changes_nothing(
    spawn: Spawn, db: Conn, module: str, queue: str, entity_type: str, table: str
) -> None:
    seeded = seed_demo(db, judgments=3, cases=3)  # every entity belongs to org-demo
    ids = seeded["judgment_ids"] if entity_type == "judgment" else seeded["case_ids"]
    before = count(db, f"SELECT count(*) FROM {table}")
    jobs = [
        build_envelope(
            entity_type=entity_type, entity_id=str(ids[0]), org_id="org-1", idempotency_key="foreign"
        ),
        build_envelope(
            entity_type=entity_type, entity_id=str(ids[1]), org_id=seeded["org_id"], idempotency_key="own"
        ),
    ]
    enqueue_many(db, queue, jobs)
    worker = spawn(module)
    wait_until(drained(db, queue), timeout=30)
    stop(worker)
    letter = db.execute("SELECT * FROM workers.dead_letters").fetchone()
    assert letter["job_key"] == "foreign" and letter["error_type"] == "TenantMismatch"
    assert count(db, "SELECT count(*) FROM workers.dead_letters") == 1
    assert count(db, f"SELECT count(*) FROM {table}") == before + 1  # the own job's effect only
    if entity_type == "enforcement_case":
        assert count(db, "SELECT count(*) FROM pgmq.q_q_outbox_processor") <= 1  # none for "foreign"


def test_a_notification_about_another_organisation_s_event_is_dead_lettered_unsent(
    spawn: Spawn, db: Conn, http: HttpRecorder, smtp: SmtpRecorder
) -> None:
    seeded = seed_demo(db, judgments=2, cases=1)
    enqueue(
        db,
        "q_escalation",
        build_envelope(
            entity_type="enforcement_case",
            entity_id=str(seeded["case_ids"][0]),
            org_id=seeded["org_id"],
            idempotency_key="esc-1",
        ),
    )
    escalator = spawn("backend.workers.escalation")
    wait_until(drained(db, "q_escalation"), timeout=30)
    stop(escalator)
    own = db.execute("SELECT message FROM pgmq.q_q_outbox_processor").fetchone()["message"]
    forged = {**own, "org_id": "org-1", "idempotency_key": "forged:notify"}
    forged["payload"]["data"]["event"]["org_id"] = "org-1"  # consistent, and still not org-1's
    enqueue(db, "q_outbox_processor", forged)
    outbox = spawn("backend.workers.outbox_processor", **outbox_env(http, smtp))
    wait_until(drained(db, "q_outbox_processor"), timeout=30)
    stop(outbox)
    letter = db.execute("SELECT job_key, error_type, error FROM workers.dead_letters").fetchall()
    assert [(r["job_key"], r["error_type"]) for r in letter] == [("forged:notify", "TenantMismatch")]
    assert "not sent" in letter[0]["error"]
    assert set(http.key_counts()) | {m.idempotency_key for m in smtp.records} == {"esc-1:notify"}


def test_an_outbox_with_no_channel_says_which_variables_enable_one(spawn: Spawn) -> None:
    worker = spawn("backend.workers.outbox_processor")
    channels = worker.wait_for("OUTBOX_CHANNELS")
    stop(worker)
    assert set(channels) >= {"worker_id", "fix"} and not {"webhook", "slack", "discord", "email"} & set(
        channels
    )
    for variable in ("OUTBOX_WEBHOOK_URL", "OUTBOX_SLACK_WEBHOOK_URL", "OUTBOX_DISCORD_WEBHOOK_URL"):
        assert variable in channels["fix"]
    assert "OUTBOX_SMTP_HOST and OUTBOX_SMTP_FROM" in channels["fix"]
