"""Every maintenance write runs under its bound: retention, queue samples, delivery records
and the inspector's dead-letter replay and discard. Each is made to wait on a lock held by
another session and must give up after its bound, leaving the session's settings as they
were (a pooled connection goes back to the pool unchanged)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from backend.db import queries as q
from backend.db import upkeep
from tests.helpers import one
from tools.worker_inspector import queries as inspector

Conn = psycopg.Connection[Any]

LIMIT_MS = 300
# The session's own timeout: without the bound, the call would wait this long, not forever.
UNBOUNDED_MS = 4000


@pytest.fixture
def other(clean_db: str) -> Iterator[Conn]:
    """A second session, in a transaction, that holds the locks the call under test waits on."""
    with psycopg.connect(clean_db) as conn:
        yield conn
        conn.rollback()


def _gives_up_at_its_bound(db: Conn, call: Callable[[], object]) -> None:
    db.execute(f"SET statement_timeout = {UNBOUNDED_MS}")
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        call()
    took_ms = (time.monotonic() - started) * 1000
    assert LIMIT_MS <= took_ms < UNBOUNDED_MS / 2, f"gave up after {took_ms:.0f} ms"
    settings = db.execute(
        "SELECT current_setting('statement_timeout') AS st,"
        " current_setting('idle_in_transaction_session_timeout') AS idle"
    ).fetchone()
    assert settings == {"st": f"{UNBOUNDED_MS // 1000}s", "idle": "0"}
    assert db.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_retention_chunk_gives_up_at_its_bound(db: Conn, other: Conn) -> None:
    db.execute(
        "INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname, pid,"
        " version, started_at, last_heartbeat_at, stopped_at) VALUES ('w-old', 'q', 'q', 'STOPPED',"
        " 'h', 1, 'v', now(), now() - interval '10 days', now() - interval '10 days')"
    )
    other.execute("SELECT 1 FROM workers.heartbeats WHERE worker_id = 'w-old' FOR UPDATE")
    _gives_up_at_its_bound(db, lambda: upkeep.prune(db, ledger_days=7, heartbeat_days=7, limit_ms=LIMIT_MS))


def test_a_queue_sample_gives_up_at_its_bound(db: Conn, other: Conn) -> None:
    other.execute("LOCK TABLE workers.queue_samples IN ACCESS EXCLUSIVE MODE")
    _gives_up_at_its_bound(db, lambda: q.sample_queue(db, "q_probe", 60, limit_ms=LIMIT_MS))


def test_pruning_delivery_records_gives_up_at_its_bound(db: Conn, other: Conn) -> None:
    other.execute("LOCK TABLE workers.deliveries IN ACCESS EXCLUSIVE MODE")
    _gives_up_at_its_bound(db, lambda: q.prune_deliveries(db, "q_probe", limit_ms=LIMIT_MS))


def _locked_letter(db: Conn, other: Conn) -> int:
    letter = db.execute(
        "INSERT INTO workers.dead_letters (queue_name, msg_id, job_key, message, error, error_type,"
        " attempts) VALUES ('q_probe', 1, 'k-1', '{}', 'boom', 'RuntimeError', 5) RETURNING id"
    ).fetchone()
    assert letter is not None
    other.execute("SELECT 1 FROM workers.dead_letters WHERE id = %s FOR UPDATE", (letter["id"],))
    return int(letter["id"])


def test_an_inspector_replay_gives_up_at_its_bound(db: Conn, other: Conn) -> None:
    letter = _locked_letter(db, other)
    _gives_up_at_its_bound(db, lambda: inspector.replay(db, letter, limit_ms=LIMIT_MS))
    other.rollback()
    assert one(db, "SELECT count(*) FROM pgmq.q_q_probe") == 0, "nothing was sent"


def test_an_inspector_discard_gives_up_at_its_bound(db: Conn, other: Conn) -> None:
    letter = _locked_letter(db, other)
    _gives_up_at_its_bound(db, lambda: inspector.discard(db, letter, "bad enqueue", limit_ms=LIMIT_MS))
