"""The crash record of a transactional batch (``DeliveryLog``) against a real database: it
commits on a connection of its own, whatever becomes of the batch's transaction."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from backend.db.connect import connect
from backend.workers.crash_record import DeliveryLog

Conn = psycopg.Connection[Any]

QUEUE = "q_probe"
WORKER = "crash-record-worker"


def recorded(db: Conn) -> dict[str, list[int]]:
    """worker id -> the message ids of its record, as another session sees them."""
    rows = db.execute("SELECT worker_id, msg_ids FROM workers.deliveries").fetchall()
    return {r["worker_id"]: r["msg_ids"] for r in rows}


@pytest.fixture
def log(clean_db: str) -> Iterator[DeliveryLog]:
    # Wired as the runtime wires it: an autocommit connection of its own, opened on demand.
    log = DeliveryLog(
        queue_name=QUEUE, worker_id=WORKER, open_conn=lambda: connect(clean_db, f"{WORKER}:deliveries")
    )
    yield log
    log.close()


def test_a_record_commits_while_the_batch_is_open_and_outlives_its_rollback(
    clean_db: str, db: Conn, log: DeliveryLog
) -> None:
    with psycopg.connect(clean_db) as batch:  # a transaction, as a batch's is
        batch.execute("SELECT pg_current_xact_id()")
        log.record([11, 12, 13])
        log.confirm(5.0)
        assert recorded(db) == {WORKER: [11, 12, 13]}, "seen by another session while the batch is open"
        batch.rollback()
    assert recorded(db) == {WORKER: [11, 12, 13]}, "a batch rolled back keeps its crash record"


def test_a_record_replaces_the_workers_previous_one_and_forget_removes_it(db: Conn, log: DeliveryLog) -> None:
    db.execute(
        "INSERT INTO workers.deliveries (worker_id, queue_name, msg_ids) VALUES ('other', %s, '{7}')",
        (QUEUE,),
    )
    log.record([1, 2])
    log.confirm(5.0)
    log.record([3])
    log.confirm(5.0)
    assert recorded(db) == {WORKER: [3], "other": [7]}
    log.forget(5.0)
    assert recorded(db) == {"other": [7]}, "only this worker's record goes"
