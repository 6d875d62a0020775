"""Processing semantics on a real PostgreSQL, with the processor driven in-process."""

from __future__ import annotations

import itertools
import logging
import random
import time
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from backend.db import ledger as ledger_mod
from backend.db import queries as q
from backend.db import rescue as rescue_mod
from backend.db.ledger import claim
from backend.enqueue import build_envelope, enqueue
from backend.errors import PermanentJobError
from backend.jobs import Job
from backend.workers.base import HandlerKind
from backend.workers.crash_record import DeliveryLog
from backend.workers.external import ExternalProcessor
from backend.workers.processor import Processor
from backend.workers.records import ProcessingOptions
from backend.workers.transactional import TransactionalProcessor

Conn = psycopg.Connection[Any]
QUEUE = "q_probe"


class Recorder:
    """A handler that writes one row per run on the job's connection, and can be told to fail."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[tuple[str, int, float]] = []
        self.batches: list[list[str]] = []

    def handle(self, conn: Conn, job: Job) -> None:
        self.calls.append((job.idempotency_key, job.attempt, time.monotonic()))
        conn.execute(
            "INSERT INTO probe.effects (job_key, worker_id, attempt) VALUES (%s, 'w', %s)",
            (job.idempotency_key, job.attempt),
        )
        if self.fail.get(job.idempotency_key, 0) >= job.attempt:
            raise RuntimeError(f"planned failure of {job.idempotency_key}")
        if self.fail.get(job.idempotency_key) == -1:
            raise PermanentJobError("never possible")

    def handle_batch(self, conn: Conn, jobs: list[Job]) -> None:
        self.batches.append(sorted(j.idempotency_key for j in jobs))
        for job in jobs:
            self.handle(conn, job)


_LOGS: list[DeliveryLog] = []


@pytest.fixture(autouse=True)
def _close_delivery_logs() -> Any:
    yield
    while _LOGS:
        _LOGS.pop().close()


def processor(
    conn_url: str,
    handler: Any,
    kind: HandlerKind = "transactional",
    *,
    shared_keys: bool = False,
    **opts: Any,
) -> Processor:
    options = ProcessingOptions(**{"visibility_timeout_s": 5, "retry_base_s": 1.0, **opts})
    deliveries = DeliveryLog(
        queue_name=QUEUE,
        worker_id="test-worker",
        open_conn=lambda: psycopg.connect(conn_url, autocommit=True),
    )
    _LOGS.append(deliveries)
    common: dict[str, Any] = {
        "queue": QUEUE,
        "worker_id": "test-worker",
        "options": options,
        "rng": random.Random(7),
        "shared_keys": shared_keys,
    }
    if kind == "transactional":
        return TransactionalProcessor(handler=handler, deliveries=deliveries, **common)
    return ExternalProcessor(handler=handler, **common)


def send(db: Conn, key: str, **payload: Any) -> int:
    return enqueue(
        db,
        QUEUE,
        build_envelope(entity_type="probe", entity_id=key, org_id="o", idempotency_key=key, payload=payload),
    )


def effects(db: Conn, key: str | None = None) -> int:
    if key is None:
        return int(db.execute("SELECT count(*) AS n FROM probe.effects").fetchone()["n"])
    return int(
        db.execute("SELECT count(*) AS n FROM probe.effects WHERE job_key = %s", (key,)).fetchone()["n"]
    )


def ledger(db: Conn, key: str) -> dict[str, Any]:
    row: dict[str, Any] = db.execute(
        "SELECT * FROM workers.processed_jobs WHERE job_key = %s", (key,)
    ).fetchone()
    return row


def queue_depth(db: Conn) -> int:
    return int(db.execute("SELECT count(*) AS n FROM pgmq.q_q_probe").fetchone()["n"])


def run_until(proc: Processor, conn: Conn, done: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "processing did not finish in time"
        if proc.process(conn) == 0:
            time.sleep(0.05)


@pytest.fixture
def work_conn(clean_db: str) -> Any:
    with psycopg.connect(clean_db, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        yield conn


def test_a_batch_completes_every_job_once(db: Conn, work_conn: Conn, clean_db: str) -> None:
    for i in range(250):
        send(db, f"k{i}")
    proc = processor(clean_db, Recorder())
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert effects(db) == 250
    assert (
        db.execute(
            "SELECT count(*) AS n FROM workers.processed_jobs WHERE status = 'completed' AND attempts = 1"
        ).fetchone()["n"]
        == 250
    )
    assert proc.counters.processed == 250


@pytest.mark.parametrize(
    ("body", "reason", "error_type"),
    [
        ("just a string", "must be a JSON object, got string", "InvalidEnvelope"),
        ([1, 2, 3], "must be a JSON object, got array", "InvalidEnvelope"),
        (
            {"entity_type": "x", "entity_id": "1", "org_id": "o", "payload": {}},
            "missing field(s): idempotency_key",
            "InvalidEnvelope",
        ),
        (
            {"idempotency_key": 7, "entity_type": "x", "entity_id": "1", "org_id": "o", "payload": {}},
            "idempotency_key must be a non-empty string, got number",
            "InvalidEnvelope",
        ),
        (
            {"idempotency_key": "k", "entity_type": "x", "entity_id": "1", "org_id": "o", "payload": []},
            "payload must be a JSON object, got array",
            "InvalidEnvelope",
        ),
        (
            {
                "idempotency_key": "k",
                "entity_type": "x",
                "entity_id": "1",
                "org_id": "o",
                "payload": {"blob": "x" * 300_000},
            },
            "over WORKER_MAX_PAYLOAD_BYTES (262144)",
            "PayloadTooLarge",
        ),
    ],
)
def test_malformed_messages_are_dead_lettered_with_their_reason(
    db: Conn, work_conn: Conn, clean_db: str, body: Any, reason: str, error_type: str
) -> None:
    db.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(body)))
    send(db, "good")
    proc = processor(clean_db, Recorder())
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    letters = db.execute("SELECT * FROM workers.dead_letters").fetchall()
    assert len(letters) == 1
    assert reason in letters[0]["error"] and letters[0]["error_type"] == error_type
    assert letters[0]["message"] == body and letters[0]["job_key"] is None
    assert effects(db, "good") == 1 and ledger(db, "good")["status"] == "completed"
    assert db.execute("SELECT count(*) AS n FROM pgmq.a_q_probe").fetchone()["n"] == 0


def test_same_key_enqueued_twice_has_one_effect(db: Conn, work_conn: Conn, clean_db: str) -> None:
    send(db, "twice")
    send(db, "twice")
    proc = processor(clean_db, Recorder())
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    send(db, "twice")  # a later redelivery of a completed key
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert effects(db, "twice") == 1
    assert ledger(db, "twice")["attempts"] == 1


def test_a_batch_is_recorded_and_held_by_lock_before_the_handler_runs(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    """While the batch runs, every other reader skips its messages, its delivery record is
    committed, and the messages are not rewritten (pgmq.read would set vt and read_ct of
    each), only deleted with their claim inside the batch's transaction; a batch whose
    handler raises is rolled back and forgotten, and the next batch runs the same jobs one
    by one."""
    seen: dict[str, Any] = {}

    class Peek(Recorder):
        def handle_batch(self, conn: Conn, jobs: list[Job]) -> None:
            with psycopg.connect(clean_db, autocommit=True) as other:
                seen["pgmq.read"] = other.execute("SELECT * FROM pgmq.read(%s, 30, 10)", (QUEUE,)).fetchall()
                seen["record"] = other.execute(
                    "SELECT msg_ids FROM workers.deliveries WHERE worker_id = 'test-worker'"
                ).fetchone()
                seen["outside"] = other.execute("SELECT count(*) FROM pgmq.q_q_probe").fetchone()[0]
            seen["inside"] = conn.execute("SELECT count(*) AS n FROM pgmq.q_q_probe").fetchone()["n"]
            seen["updated"] = conn.execute(
                "SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = 'pgmq.q_q_probe'::regclass"
            ).fetchone()["n_tup_upd"]
            raise RuntimeError("roll this batch back")  # the next batch runs one by one

    ids = [send(db, f"held{i}") for i in range(3)]
    proc = processor(clean_db, Peek())
    assert proc.process(work_conn) == 3  # rolled back, no attempt counted
    assert seen["pgmq.read"] == []
    assert seen["record"] == (ids,)
    assert seen["updated"] == 0, "the batch wrote new versions of its messages"
    assert (seen["inside"], seen["outside"]) == (0, 3), "deleted with their claim, not yet committed"
    assert (
        db.execute(
            "SELECT count(*) AS n FROM pgmq.q_q_probe WHERE read_ct = 0 AND vt <= clock_timestamp()"
        ).fetchone()["n"]
        == 3
    )
    assert db.execute("SELECT count(*) AS n FROM workers.deliveries").fetchone()["n"] == 0
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert effects(db) == 3


def test_a_batch_whose_worker_died_runs_alone_each_attempt_counted(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    """A delivery record left by a worker that never finished its batch: each of its jobs
    runs alone, claimed (attempt counted) before its handler, the others in a batch."""
    ids = [send(db, f"orphan{i}") for i in range(3)]
    send(db, "fresh")
    db.execute(
        "INSERT INTO workers.deliveries (worker_id, queue_name, msg_ids) VALUES ('dead-worker', %s, %s)",
        (QUEUE, ids),
    )
    recorder = Recorder()
    proc = processor(clean_db, recorder)
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert effects(db) == 4
    rows = {r["job_key"]: r for r in db.execute("SELECT * FROM workers.processed_jobs")}
    assert all(
        rows[f"orphan{i}"]["attempts"] == 1 and rows[f"orphan{i}"]["status"] == "completed" for i in range(3)
    )
    assert recorder.batches == [["fresh"]], "the orphans ran alone, the fresh job in a batch"
    with psycopg.connect(clean_db, autocommit=True) as conn:
        assert q.prune_deliveries(conn, QUEUE) == 2, "records none of whose messages is left go"


def test_a_failed_transactional_job_is_delayed_by_its_backoff(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    send(db, "once")
    proc = processor(clean_db, Recorder(fail={"once": 1}), retry_base_s=4.0)
    proc.process(work_conn)  # optimistic: rolled back
    proc.process(work_conn)  # one by one: attempt 1 fails and commits
    row = db.execute(
        "SELECT extract(epoch FROM vt - clock_timestamp())::float8 AS wait FROM pgmq.q_q_probe"
    ).fetchone()
    assert 1.0 <= row["wait"] <= 4.0  # jittered to half..all of 4 s, whole seconds
    assert ledger(db, "once")["status"] == "failed"


def test_failures_retry_with_backoff_then_complete(
    db: Conn, work_conn: Conn, clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Recorder(fail={"flaky": 2})
    send(db, "flaky")
    for i in range(5):
        send(db, f"other{i}")
    proc = processor(clean_db, handler)
    with caplog.at_level(logging.INFO, logger="dragonfly.events"):
        run_until(proc, work_conn, lambda: queue_depth(db) == 0, timeout=30)
    row = ledger(db, "flaky")
    assert row["status"] == "completed" and row["attempts"] == 3
    assert effects(db, "flaky") == 1, "the failed attempts' writes were rolled back"
    # A batch runs optimistically first, so attempt 1 may run twice (the first rolled back).
    runs = sorted({a: t for key, a, t in handler.calls if key == "flaky"}.values())
    delays = [
        r.data["retry_in_s"]
        for r in caplog.records  # type: ignore[attr-defined]
        if getattr(r, "event", "") == "JOB_FAILED"
    ]
    assert len(runs) == 3 and len(delays) == 2
    for (before, after), delay in zip(itertools.pairwise(runs), delays, strict=True):
        assert after - before >= delay - 0.05
    assert all(effects(db, f"other{i}") == 1 for i in range(5))


class ExternalFailingOnce:
    def __init__(self) -> None:
        self.attempts: list[int] = []

    def handle(self, job: Job) -> None:
        self.attempts.append(job.attempt)
        if job.attempt == 1:
            raise RuntimeError("planned failure")


@pytest.mark.parametrize("kind", ["transactional", "external"])
def test_copies_of_a_failed_key_wait_out_its_backoff(
    db: Conn, work_conn: Conn, clean_db: str, kind: HandlerKind
) -> None:
    """A key sent twice whose first attempt fails: the copy waits with the first message,
    so the next attempt still comes after the backoff, not at once."""
    send(db, "twin")
    send(db, "twin")
    handler: Any = Recorder(fail={"twin": 1}) if kind == "transactional" else ExternalFailingOnce()
    proc = processor(clean_db, handler, kind=kind, retry_base_s=4.0)
    for _ in range(3):  # transactional: optimistic (rolled back), then one by one
        proc.process(work_conn)
        if ledger(db, "twin") is not None:
            break
    assert ledger(db, "twin")["status"] == "failed"
    for _ in range(3):  # external jobs are taken one at a time: the copy is taken and put off
        proc.process(work_conn)
    assert ledger(db, "twin")["attempts"] == 1, "a copy ran during the backoff"
    waits = [
        r["wait"]
        for r in db.execute(
            "SELECT extract(epoch FROM vt - clock_timestamp())::float8 AS wait FROM pgmq.q_q_probe"
        )
    ]
    assert len(waits) == 2 and all(w >= 1.0 for w in waits)
    assert ledger(db, "twin")["attempts"] == 1
    run_until(proc, work_conn, lambda: queue_depth(db) == 0, timeout=30)
    assert ledger(db, "twin")["status"] == "completed" and ledger(db, "twin")["attempts"] == 2


def test_always_failing_job_is_dead_lettered_and_replay_completes_it_once(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    handler = Recorder(fail={"doomed": 99})
    send(db, "doomed")
    proc = processor(clean_db, handler, max_attempts=3)
    run_until(proc, work_conn, lambda: queue_depth(db) == 0, timeout=30)
    send(db, "after")
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert effects(db, "after") == 1, "the worker keeps processing other jobs"
    row = ledger(db, "doomed")
    assert row["status"] == "dead" and row["attempts"] == 3
    letter = db.execute("SELECT * FROM workers.dead_letters WHERE job_key = 'doomed'").fetchone()
    assert letter["attempts"] == 3 and "planned failure" in letter["error"]
    assert letter["message"]["idempotency_key"] == "doomed"

    from tools.worker_inspector.queries import replay_dead_letter

    handler.fail.clear()
    assert replay_dead_letter(db, letter["id"]) is not None
    assert replay_dead_letter(db, letter["id"]) is None, "a dead letter replays once"
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert ledger(db, "doomed")["status"] == "completed"
    assert effects(db, "doomed") == 1


def test_permanent_error_is_dead_lettered_without_retry(db: Conn, work_conn: Conn, clean_db: str) -> None:
    send(db, "never")
    proc = processor(clean_db, Recorder(fail={"never": -1}))
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert ledger(db, "never")["attempts"] == 1 and ledger(db, "never")["status"] == "dead"


class External:
    def __init__(self) -> None:
        self.keys: list[tuple[str, int]] = []

    def handle(self, job: Job) -> None:
        self.keys.append((job.idempotency_key, job.attempt))


def test_an_expired_claim_is_visible_as_stuck_then_taken_over(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    msg_id = send(db, "orphan")
    # A worker that died after committing its claim: the message and the claim stay leased.
    q.fetch_messages(db, QUEUE, qty=1, vt_s=1, max_bytes=1000)
    claim(db, queue=QUEUE, worker_id="dead-worker", keys=["orphan"], msg_ids=[msg_id], lease_s=1)
    stuck = (
        "SELECT job_key FROM workers.processed_jobs WHERE status = 'processing'"
        " AND lease_expires_at < clock_timestamp()"
    )
    assert db.execute(stuck).fetchall() == []
    handler = External()
    proc = processor(clean_db, handler, kind="external")
    assert proc.process(work_conn) == 0, "a live claim is never stolen"
    time.sleep(1.1)
    assert [r["job_key"] for r in db.execute(stuck)] == ["orphan"]
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert handler.keys == [("orphan", 2)]
    row = ledger(db, "orphan")
    assert row["status"] == "completed" and row["attempts"] == 2 and row["worker_id"] == "test-worker"
    assert db.execute(stuck).fetchall() == []


def test_a_null_message_is_dead_lettered_not_a_crash(db: Conn, work_conn: Conn, clean_db: str) -> None:
    db.execute("SELECT pgmq.send(%s, NULL)", (QUEUE,))
    send(db, "after-null")
    proc = processor(clean_db, Recorder())
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    letter = db.execute("SELECT * FROM workers.dead_letters").fetchone()
    assert "got null" in letter["error"] and letter["job_key"] is None
    assert effects(db, "after-null") == 1


def test_an_external_job_whose_workers_keep_dying_is_dead_lettered(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    msg_id = send(db, "killer")
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts,"
        " worker_id, lease_expires_at) VALUES ('killer', %s, %s, 'processing', 3,"
        " 'dead-worker', clock_timestamp() - interval '1 second')",
        (QUEUE, msg_id),
    )
    handler = External()
    proc = processor(clean_db, handler, kind="external", max_attempts=3)
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert handler.keys == [], "a job that killed every worker it ran on is not run again"
    assert ledger(db, "killer")["status"] == "dead"
    letter = db.execute("SELECT * FROM workers.dead_letters").fetchone()
    assert letter["error_type"] == "AttemptsExhausted" and letter["attempts"] == 3


class Overtaken:
    """An external handler during which another worker takes the claim over."""

    def __init__(self, url: str) -> None:
        self.url = url

    def handle(self, job: Job) -> None:
        with psycopg.connect(self.url, autocommit=True) as other:
            other.execute(
                "UPDATE workers.processed_jobs SET worker_id = 'replica-b', attempts ="
                " attempts + 1 WHERE job_key = %s",
                (job.idempotency_key,),
            )


def test_an_external_worker_that_lost_its_claim_leaves_it_alone(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    send(db, "overtaken")
    proc = processor(clean_db, Overtaken(clean_db), kind="external")
    assert proc.process(work_conn) == 1
    row = ledger(db, "overtaken")
    assert (row["status"], row["worker_id"], row["attempts"]) == ("processing", "replica-b", 2)
    assert queue_depth(db) == 1, "the message is the new owner's to delete"


def test_every_transaction_bounds_itself_and_leaves_the_session_unbounded(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    """The bound is set per transaction (SET LOCAL), as it must be behind a transaction
    pooler, where the next transaction on the server connection may be another client's."""
    seen: dict[str, str] = {}

    class Look(Recorder):
        def handle(self, conn: Conn, job: Job) -> None:
            for name in ("idle_in_transaction_session_timeout", "statement_timeout"):
                seen[f"{job.idempotency_key}:{name}"] = conn.execute(
                    "SELECT current_setting(%s) AS v", (name,)
                ).fetchone()["v"]

    send(db, "batched")
    proc = processor(clean_db, Look(), visibility_timeout_s=7)
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    db.execute(
        "INSERT INTO workers.deliveries (worker_id, queue_name, msg_ids)"
        " VALUES ('dead-worker', %s, ARRAY[%s::bigint])",
        (QUEUE, send(db, "alone")),
    )
    run_until(proc, work_conn, lambda: queue_depth(db) == 0)
    assert seen == {
        f"{k}:{n}": "7s"
        for k in ("batched", "alone")
        for n in ("idle_in_transaction_session_timeout", "statement_timeout")
    }
    after = work_conn.execute(
        "SELECT current_setting('idle_in_transaction_session_timeout') AS i,"
        " current_setting('statement_timeout') AS s"
    ).fetchone()
    assert (after["i"], after["s"]) == ("0", "0")


def test_a_batch_goes_on_without_the_keys_another_workers_open_transaction_is_claiming(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    """A key that another worker's open transaction is claiming (a batch in flight, or
    frozen) is skipped at once, its message delayed; the rest of the batch completes."""
    for key in ("held", "a", "b"):
        send(db, key)
    other = psycopg.connect(clean_db, autocommit=True)
    try:
        with other.transaction():
            assert claim(other, queue=QUEUE, worker_id="other", keys=["held"], msg_ids=[0], lease_s=5) == {
                "held": 1
            }
            recorder = Recorder()
            proc = processor(clean_db, recorder)
            started = time.monotonic()
            assert proc.process(work_conn) == 3
            took_s = time.monotonic() - started
            assert recorder.batches == [["a", "b"]]
            delayed = db.execute("SELECT count(*) AS n FROM pgmq.q_q_probe WHERE vt > clock_timestamp()")
            assert delayed.fetchone()["n"] == 1
    finally:
        other.close()
    assert took_s < 1
    assert effects(db) == 2 and effects(db, "held") == 0


def test_a_key_whose_run_alone_ended_without_an_outcome_runs_alone_again_counted(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    """A claim left expired by a run alone (its worker lost its transaction, or died, and
    no delivery record names the message) sends the job alone again, its attempt counted:
    never merely delayed, which would bounce it forever uncounted."""
    msg_id = send(db, "orphan")
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts,"
        " worker_id, lease_expires_at) VALUES ('orphan', %s, %s, 'processing', 2,"
        " 'lost-worker', clock_timestamp() - interval '1 second')",
        (QUEUE, msg_id),
    )
    send(db, "fresh")
    recorder = Recorder()
    proc = processor(clean_db, recorder)
    assert proc.process(work_conn) == 2
    assert recorder.batches == [["fresh"]]
    row = ledger(db, "orphan")
    assert (row["status"], row["attempts"], row["worker_id"]) == ("completed", 3, "test-worker")
    assert queue_depth(db) == 0


@pytest.mark.parametrize("race", [False, True])
def test_before_0007_a_key_another_queue_holds_is_dead_lettered_and_the_batch_goes_on(
    db: Conn, work_conn: Conn, clean_db: str, monkeypatch: pytest.MonkeyPatch, race: bool
) -> None:
    """``race``: the other queue claims the key between the look-up of such keys and the
    claim (the look-up is made to miss it once, the row inserted right after)."""
    if race:
        look_up = ledger_mod.keys_on_other_queues
        missed: list[bool] = []

        def late(conn: Conn, queue: str, keys: Any) -> dict[str, str]:
            if not missed:
                missed.append(True)
                claim(db, queue="q_escalation", worker_id="x", keys=["shared"], msg_ids=[1], lease_s=5)
                return {}
            return look_up(conn, queue, keys)

        monkeypatch.setattr(ledger_mod, "keys_on_other_queues", late)
    # The ledger as it is between migrations 0006 and 0007: the key alone is the primary key.
    db.execute(
        "ALTER TABLE workers.processed_jobs DROP CONSTRAINT processed_jobs_pkey,"
        " ADD CONSTRAINT processed_jobs_pkey PRIMARY KEY (job_key)"
    )
    db.execute(
        "CREATE UNIQUE INDEX processed_jobs_queue_key_idx ON workers.processed_jobs (queue_name, job_key)"
    )
    try:
        if not race:
            claim(db, queue="q_escalation", worker_id="x", keys=["shared"], msg_ids=[1], lease_s=5)
        send(db, "shared")
        send(db, "own")
        proc = processor(clean_db, Recorder(), shared_keys=True)
        run_until(proc, work_conn, lambda: queue_depth(db) == 0)
        letter = db.execute("SELECT job_key, error_type, error FROM workers.dead_letters").fetchone()
        assert (letter["job_key"], letter["error_type"]) == ("shared", "KeyInUseOnAnotherQueue")
        assert "q_escalation" in letter["error"] and "0007" in letter["error"]
        assert effects(db, "own") == 1 and effects(db, "shared") == 0
    finally:
        db.execute("TRUNCATE workers.processed_jobs")
        db.execute(
            "ALTER TABLE workers.processed_jobs DROP CONSTRAINT processed_jobs_pkey,"
            " ADD CONSTRAINT processed_jobs_pkey PRIMARY KEY USING INDEX processed_jobs_queue_key_idx"
        )


def _held_by(db: Conn, worker: str, key: str, *, named: bool | None = True) -> int:
    """A message leased for 30 s and its live claim, held by ``worker`` (with a heartbeat row
    saying whether its sessions are named by its id, unless ``named`` is None)."""
    msg_id = send(db, key)
    db.execute(
        "UPDATE pgmq.q_q_probe SET vt = clock_timestamp() + interval '30 s' WHERE msg_id = %s", (msg_id,)
    )
    assert claim(db, queue=QUEUE, worker_id=worker, keys=[key], msg_ids=[msg_id], lease_s=30) == {key: 1}
    if named is not None:
        db.execute(
            "INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname, pid,"
            " version, started_at, last_heartbeat_at, metadata)"
            " VALUES (%s, 'probe', %s, 'RUNNING', 'h', 1, 'v', now(), now(), %s)",
            (worker, QUEUE, Jsonb({"named_sessions": named})),
        )
    return msg_id


def test_the_claims_of_a_worker_whose_process_is_gone_are_given_back_at_once(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    """A live claim whose worker has no session left (killed, crashed) is expired and its
    message made visible; one whose worker still has a session (frozen, or busy outside the
    database), whose sessions are not named by its id (a pooler), that never wrote a
    heartbeat, or that was last heard of before every session now connected began, keeps its
    lease; so does every claim while the server ends idle sessions."""
    gone = _held_by(db, "gone-worker", "gone")
    _held_by(db, "frozen-worker", "frozen")
    _held_by(db, "pooled-worker", "pooled", named=False)
    _held_by(db, "nameless-worker", "nameless", named=None)
    # Last heard of before every session now connected began: a restart since then, say.
    _held_by(db, "unheard-worker", "unheard")
    db.execute("UPDATE workers.processed_jobs SET updated_at = '2000-01-01' WHERE job_key = 'unheard'")
    db.execute(
        "UPDATE workers.heartbeats SET last_heartbeat_at = '2000-01-01' WHERE worker_id = 'unheard-worker'"
    )
    with psycopg.connect(clean_db, application_name="frozen-worker"):
        work_conn.execute("SET idle_session_timeout = '1min'")  # sessions may end while alive
        assert rescue_mod.rescue_orphans(work_conn, queue=QUEUE, worker_id="me") == []
        work_conn.execute("RESET idle_session_timeout")
        rescued = rescue_mod.rescue_orphans(work_conn, queue=QUEUE, worker_id="me")
        assert rescued == [rescue_mod.Rescued(job_key="gone", msg_id=gone, owner="gone-worker")]
        assert rescue_mod.rescue_orphans(work_conn, queue=QUEUE, worker_id="me") == []
    visible = db.execute("SELECT msg_id FROM pgmq.q_q_probe WHERE vt <= clock_timestamp()").fetchall()
    assert [r["msg_id"] for r in visible] == [gone]
    live = db.execute(
        "SELECT job_key FROM workers.processed_jobs WHERE lease_expires_at > clock_timestamp() ORDER BY 1"
    ).fetchall()
    assert [r["job_key"] for r in live] == ["frozen", "nameless", "pooled", "unheard"]
    # The next delivery takes the claim over as a new attempt, counted.
    handler = External()
    proc = processor(clean_db, handler, kind="external")
    run_until(proc, work_conn, lambda: ledger(db, "gone")["status"] == "completed")
    assert handler.keys == [("gone", 2)], "run once more, as its second attempt"


def test_the_idle_check_gives_back_a_gone_workers_claim_and_says_there_is_work(
    db: Conn, work_conn: Conn, clean_db: str
) -> None:
    gone = _held_by(db, "gone-worker", "gone")
    assert rescue_mod.visible_or_rescued(work_conn, queue=QUEUE, worker_id="me") == (
        True,
        [rescue_mod.Rescued(job_key="gone", msg_id=gone, owner="gone-worker")],
    )
    assert rescue_mod.visible_or_rescued(work_conn, queue=QUEUE, worker_id="me") == (True, [])
    db.execute("DELETE FROM pgmq.q_q_probe")
    assert rescue_mod.visible_or_rescued(work_conn, queue=QUEUE, worker_id="me") == (False, [])
