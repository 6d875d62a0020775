"""Retention: old completed ledger rows and old stopped heartbeats are pruned, nothing else,
in chunks of short transactions until none is left."""

from __future__ import annotations

import argparse
from typing import Any

import psycopg
import pytest

from backend.db import locks, upkeep

Conn = psycopg.Connection[Any]


def test_prune_deletes_only_old_completed_rows_and_old_stopped_heartbeats(db: Conn) -> None:
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts,"
        " completed_at) VALUES"
        " ('old-done', 'q', 1, 'completed', 1, now() - interval '10 days'),"
        " ('new-done', 'q', 2, 'completed', 1, now() - interval '1 day'),"
        " ('old-dead', 'q', 3, 'dead', 5, NULL),"
        " ('old-claim', 'q', 4, 'processing', 1, NULL)"
    )
    db.execute("UPDATE workers.processed_jobs SET updated_at = now() - interval '10 days'")
    row = (
        "INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname,"
        " pid, version, started_at, last_heartbeat_at, stopped_at) VALUES"
        " (%s, 'q', 'q', %s, 'h', 1, 'v', now(), now() - %s::interval, %s)"
    )
    db.execute(row, ("stopped-old", "STOPPED", "10 days", "-infinity"))
    db.execute("UPDATE workers.heartbeats SET stopped_at = now() - interval '10 days'")
    db.execute(row, ("stopped-new", "STOPPED", "1 hour", None))
    db.execute(
        "UPDATE workers.heartbeats SET stopped_at = now() - interval '1 hour' WHERE worker_id = 'stopped-new'"
    )
    db.execute(row, ("running-silent", "RUNNING", "10 days", None))

    assert upkeep.prune(db, ledger_days=7, heartbeat_days=7) == upkeep.Pruned(ledger_rows=1, heartbeat_rows=1)
    keys = {r["job_key"] for r in db.execute("SELECT job_key FROM workers.processed_jobs")}
    assert keys == {"new-done", "old-dead", "old-claim"}
    workers = {r["worker_id"] for r in db.execute("SELECT worker_id FROM workers.heartbeats")}
    assert workers == {"stopped-new", "running-silent"}
    assert upkeep.prune(db, ledger_days=7, heartbeat_days=7) == upkeep.Pruned()


def test_prune_is_skipped_while_another_replica_prunes(db: Conn, clean_db: str) -> None:
    with psycopg.connect(clean_db, row_factory=psycopg.rows.dict_row) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (locks.RETENTION,))
        assert upkeep.prune(db, ledger_days=7, heartbeat_days=7) is None


def _expired(db: Conn, n: int) -> None:
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts, completed_at)"
        " SELECT 'old-' || i, 'q', i, 'completed', 1, now() - interval '30 days'"
        " FROM generate_series(1, %s) i",
        (n,),
    )


def test_a_backlog_goes_in_one_pass_of_short_chunks(db: Conn) -> None:
    _expired(db, 12_000)
    result = upkeep.prune(db, ledger_days=7, heartbeat_days=7, chunk=5000, budget_s=60)
    assert result == upkeep.Pruned(ledger_rows=12_000, done=True)
    assert db.execute("SELECT count(*) AS n FROM workers.processed_jobs").fetchone()["n"] == 0


def test_a_pass_stops_at_its_time_budget_and_says_it_is_not_done(db: Conn) -> None:
    _expired(db, 12_000)
    first = upkeep.prune(db, ledger_days=7, heartbeat_days=7, chunk=5000, budget_s=0)
    assert first == upkeep.Pruned(ledger_rows=5000, done=False)
    rest = upkeep.prune(db, ledger_days=7, heartbeat_days=7, chunk=5000, budget_s=60)
    assert rest is not None and rest.ledger_rows == 7000 and rest.done


def test_the_retention_bench_prunes_everything_in_one_pass_beside_a_worker(
    clean_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from scripts import retention_bench

    args = argparse.Namespace(expired=30_000, jobs=20_000, settle=0.5, after=0.5)
    retention_bench.run(clean_db, args)
    out = capsys.readouterr().out
    assert "prune pass: 30,000 rows in" in out and "; 0 left" in out
    for window in ("before", "during", "after"):
        assert f"worker {window:>6}:" in out
