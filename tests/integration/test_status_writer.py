"""The heartbeat row's one writer (``HeartbeatWriter``) against a real database: requested
writes land, in the order their rows were built, and ``flush`` stays within its bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from backend.db.connect import make_pool
from backend.workers.status import HeartbeatWriter

Conn = psycopg.Connection[Any]

WORKER = "status-writer-worker"


class Worker:
    """The state a heartbeat row is built from; ``hold_next`` pauses the next build."""

    def __init__(self) -> None:
        self.status = "RUNNING"
        self.hold_next = False
        self.building = threading.Event()  # a held build has read the state
        self.release = threading.Event()

    def row(self) -> dict[str, Any]:
        row = {
            "worker_id": WORKER,
            "worker_name": "status-writer",
            "queue_name": "q_probe",
            "status": self.status,
            "hostname": "test",
            "pid": 1,
            "version": "test",
            "git_sha": None,
            "started_at": datetime.now(UTC),
            "jobs_processed": 0,
            "jobs_failed": 0,
            "rss_bytes": None,
            "metadata": {},
        }
        if self.hold_next:
            self.hold_next = False
            self.building.set()
            assert self.release.wait(10), "the test never released the held build"
        return row


@pytest.fixture
def pool(clean_db: str) -> Iterator[ConnectionPool[Any]]:
    pool = make_pool(clean_db, WORKER, size=1)
    pool.open(wait=True, timeout=10)
    yield pool
    pool.close()


def status(db: Conn) -> str | None:
    row = db.execute("SELECT status FROM workers.heartbeats WHERE worker_id = %s", (WORKER,)).fetchone()
    return row["status"] if row else None


def test_a_requested_write_lands_by_the_flush(db: Conn, pool: ConnectionPool[Any]) -> None:
    worker = Worker()
    writer = HeartbeatWriter(worker_id=WORKER, pool=lambda: pool, build_row=worker.row)
    writer.request()
    assert writer.flush(5.0)
    assert status(db) == "RUNNING"


def test_a_row_built_before_a_transition_never_lands_after_the_transitions_own(
    db: Conn, pool: ConnectionPool[Any]
) -> None:
    worker = Worker()
    writer = HeartbeatWriter(worker_id=WORKER, pool=lambda: pool, build_row=worker.row)
    worker.hold_next = True
    periodic = threading.Thread(target=writer.write)  # the housekeeping thread's write
    periodic.start()
    assert worker.building.wait(5), "the periodic write never built its row"
    worker.status = "STOPPED"  # the transition, while the RUNNING row is on its way
    writer.request()
    # The transition's write cannot finish while the row built before it is unwritten.
    assert not writer.flush(0.3)
    worker.release.set()
    periodic.join(5)
    assert writer.flush(5.0)
    assert status(db) == "STOPPED"


def test_flush_gives_up_within_its_timeout_when_the_pool_has_no_connection(
    db: Conn, pool: ConnectionPool[Any]
) -> None:
    worker = Worker()
    writer = HeartbeatWriter(worker_id=WORKER, pool=lambda: pool, build_row=worker.row)
    with pool.connection():  # the pool's only connection, taken
        writer.request()
        started = time.monotonic()
        assert writer.flush(0.2) is False
        assert time.monotonic() - started < 0.2 + 0.5
        assert status(db) is None
    writer.request()  # the connection given back: this write, or the one asked above, lands
    assert writer.flush(5.0)
    assert status(db) == "RUNNING"
