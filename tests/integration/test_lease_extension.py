"""Extending the leases of running jobs: this worker's messages and processing claims only,
and in one statement bounded like every transaction the runtime opens."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from backend.db import ledger

Conn = psycopg.Connection[Any]
QUEUE = "q_probe"


def _send(db: Conn, n: int) -> list[int]:
    rows = db.execute(
        "SELECT * FROM pgmq.send_batch(%s,"
        " ARRAY(SELECT jsonb_build_object('n', i) FROM generate_series(1, %s) AS i))",
        (QUEUE, n),
    ).fetchall()
    return [int(r["send_batch"]) for r in rows]


def _leases(db: Conn) -> dict[str, float]:
    rows = db.execute(
        "SELECT job_key, extract(epoch FROM lease_expires_at - clock_timestamp())::float8 AS left_s"
        " FROM workers.processed_jobs ORDER BY job_key"
    ).fetchall()
    return {r["job_key"]: r["left_s"] for r in rows}


def _visible_in(db: Conn, msg_id: int) -> float:
    row = db.execute(
        "SELECT extract(epoch FROM vt - clock_timestamp())::float8 AS s"
        " FROM pgmq.q_q_probe WHERE msg_id = %s",
        (msg_id,),
    ).fetchone()
    assert row is not None
    return float(row["s"])


def test_only_this_worker_s_messages_and_processing_claims_are_extended(db: Conn) -> None:
    mine, theirs = _send(db, 2)
    ledger.claim(db, queue=QUEUE, worker_id="w-1", keys=["mine"], msg_ids=[mine], lease_s=5)
    ledger.claim(db, queue=QUEUE, worker_id="w-2", keys=["theirs"], msg_ids=[theirs], lease_s=5)
    ledger.extend_leases(
        db, queue=QUEUE, worker_id="w-1", msg_ids=[mine], keys=["mine", "theirs"], lease_s=60, limit_ms=2_000
    )
    leases = _leases(db)
    assert 55 < leases["mine"] <= 60
    assert leases["theirs"] <= 5
    assert 55 < _visible_in(db, mine) <= 60
    assert _visible_in(db, theirs) <= 0


def test_a_row_lock_on_a_running_job_s_message_ends_the_extension_at_its_bound(
    db: Conn, clean_db: str
) -> None:
    (msg_id,) = _send(db, 1)
    ledger.claim(db, queue=QUEUE, worker_id="w-1", keys=["k"], msg_ids=[msg_id], lease_s=5)
    with psycopg.connect(clean_db) as holder:
        holder.execute("SELECT 1 FROM pgmq.q_q_probe WHERE msg_id = %s FOR UPDATE", (msg_id,))
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            ledger.extend_leases(
                db, queue=QUEUE, worker_id="w-1", msg_ids=[msg_id], keys=["k"], lease_s=60, limit_ms=500
            )
        assert time.monotonic() - started < 3
        holder.rollback()
    # Nothing half done: the statement was one transaction.
    assert _leases(db)["k"] <= 5
