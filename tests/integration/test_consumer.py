"""The ``Consumer`` seam, in-process on a real PostgreSQL: the loop's session ended by the
server (``pg_terminate_backend``) is an outage the loop rides out, reconnecting and saying
so (``DB_OUTAGE``, ``DB_RECOVERED``), and the jobs sent after it still run."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
import pytest

from backend.config import load_settings
from backend.db.connect import make_pool
from backend.enqueue import build_envelope, enqueue
from backend.workers.consumer import Consumer
from backend.workers.external import ExternalProcessor
from backend.workers.records import ProcessingOptions

Conn = psycopg.Connection[Any]
NAME = "consumer-seam"


class Handled:
    def __init__(self) -> None:
        self.keys: list[str] = []

    def handle(self, job: Any) -> None:
        self.keys.append(job.idempotency_key)


def _wait(condition: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _send(db: Conn, key: str) -> None:
    envelope = build_envelope(entity_type="probe", entity_id=key, org_id="o", idempotency_key=key, payload={})
    enqueue(db, "q_probe", envelope)


def test_the_loop_rides_out_its_session_ended_by_the_server(
    db: Conn, clean_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = load_settings(
        {"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": clean_db, "WORKER_POLL_INTERVAL_S": "0.05"}
    )
    handler = Handled()
    processor = ExternalProcessor(
        handler=handler,
        queue="q_probe",
        worker_id=NAME,
        options=ProcessingOptions(visibility_timeout_s=5, rescue_orphans=False),
    )
    stopping = threading.Event()
    consumer = Consumer(processor=processor, settings=settings, stopping=stopping)
    pool = make_pool(clean_db, NAME)
    pool.open(wait=True, timeout=10)
    thread = threading.Thread(target=consumer.run, args=(pool,), kwargs={"notifications": False}, daemon=True)
    try:
        thread.start()
        _send(db, "before")
        _wait(lambda: handler.keys == ["before"])

        ended = db.execute(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (NAME,),
        ).fetchone()["n"]
        assert ended >= 1

        def events(name: str) -> list[dict[str, Any]]:
            return [getattr(r, "data", {}) for r in caplog.records if getattr(r, "event", None) == name]

        _wait(lambda: events("DB_RECOVERED"))
        [outage] = events("DB_OUTAGE")
        assert outage["worker_id"] == NAME and outage["error_type"]
        assert events("DB_RECOVERED")[0]["outage_s"] >= 0
        _send(db, "after")
        _wait(lambda: handler.keys == ["before", "after"])
    finally:
        stopping.set()
        consumer.wake()
        thread.join(10)
        pool.close(timeout=1.0)
        consumer.close()
    assert not thread.is_alive()
