"""A worker frozen inside a retention pass never stalls a healthy replica.

Worker A prunes a backlog of 300,000 old completed ledger rows and is stopped (SIGSTOP)
while one of its prune transactions is deleting them. A healthy replica, B, then meets a
message whose key is one of the rows that transaction deleted (an old job enqueued again),
ahead of 10 fresh jobs: it must finish all of them as if A were not there.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import psycopg
import pytest
from psycopg import IsolationLevel
from psycopg.rows import dict_row

from backend.enqueue import enqueue, enqueue_many
from scripts.harness.process import WorkerProcess
from tests.helpers import job, one, wait_until

pytestmark = pytest.mark.slow
Conn = psycopg.Connection[Any]

OLD_ROWS = 300_000
FRESH = 10
WITHIN_S = 15.0

# A's session inside a prune transaction, caught while its DELETE of ledger rows runs. The
# backlog makes 60 chunks of tens of milliseconds each, so a poll every few milliseconds
# meets one early in the pass (in practice the first); and at that moment A's process waits
# for the statement's result, so a SIGSTOP sent now lands inside the transaction.
_PRUNING = """
SELECT backend_xid::text AS xid FROM pg_stat_activity
WHERE application_name = %s AND state = 'active' AND backend_xid IS NOT NULL
  AND query LIKE '%%DELETE FROM workers.processed_jobs%%'
"""


def _old_ledger(db: Conn) -> None:
    """Completed jobs of three days ago: old enough for A's retention, not for B's."""
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts,"
        " created_at, updated_at, completed_at)"
        " SELECT 'old-' || i, 'q_probe', i, 'completed', 1, t, t, t"
        " FROM generate_series(1, %s) AS i, (SELECT now() - interval '3 days' AS t) AS c",
        (OLD_ROWS,),
    )


def _freeze_inside_prune(url: str, db: Conn, a: WorkerProcess, worker_id: str) -> str:
    """Stop A inside a prune transaction; return the key of a ledger row that transaction
    deleted. Each poll is a REPEATABLE READ snapshot taken while that transaction runs, so the
    rows it deletes stay visible in it, marked with its xid, whether it commits, rolls back
    or stays open."""
    with psycopg.connect(url, row_factory=dict_row) as watch:
        watch.isolation_level = IsolationLevel.REPEATABLE_READ
        deadline = time.monotonic() + 20
        while True:
            row = watch.execute(_PRUNING, (worker_id,)).fetchone()
            if row is not None:
                a.send(signal.SIGSTOP)
                break
            watch.rollback()  # a new snapshot, and fresh activity, for the next poll
            assert time.monotonic() < deadline, "worker A never pruned"
            time.sleep(0.002)
        # The statement ends on the server even with A stopped; then its rows are all marked.
        wait_until(
            lambda: (
                not one(
                    db,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'active'",
                    worker_id,
                )
            ),
            timeout=10,
            interval=0.01,
        )
        key = one(
            watch, "SELECT job_key FROM workers.processed_jobs WHERE xmax = %s::xid LIMIT 1", row["xid"]
        )
        watch.rollback()
    assert key is not None, "no ledger row deleted by the frozen transaction"
    return str(key)


def test_a_worker_frozen_while_pruning_never_stalls_a_healthy_replica(
    spawn: Any, db: Conn, clean_db: str
) -> None:
    _old_ledger(db)
    b = spawn(WORKER_VISIBILITY_TIMEOUT_S=3)
    b.wait_boot()
    a = spawn(WORKER_VISIBILITY_TIMEOUT_S=3, WORKER_PRUNE_INTERVAL_S=0.1, WORKER_LEDGER_RETENTION_DAYS=1)
    a_id = a.wait_boot()["worker_id"]
    old_key = _freeze_inside_prune(clean_db, db, a, a_id)
    try:
        # The old job first: the oldest message heads every batch B takes.
        enqueue(db, "q_probe", job(old_key))
        enqueue_many(db, "q_probe", [job(f"fresh{i}") for i in range(FRESH)])
        started = time.monotonic()

        def finished() -> tuple[int, bool]:
            fresh = one(db, "SELECT count(*) FROM probe.effects WHERE job_key LIKE 'fresh%%'")
            old = one(db, "SELECT count(*) FROM probe.effects WHERE job_key = %s", old_key)
            return int(fresh), bool(old)

        while finished() != (FRESH, True) and time.monotonic() - started < WITHIN_S:
            time.sleep(0.05)
        took_s = time.monotonic() - started
        fresh, old = finished()
        assert (fresh, old) == (FRESH, True), (
            f"in {WITHIN_S:g} s beside a worker frozen while pruning, the healthy replica completed"
            f" {fresh} of {FRESH} fresh jobs and {'' if old else 'not '}the old key enqueued again"
            f" ({len(b.named('TRANSACTION_TIMED_OUT'))} transactions timed out)"
        )
        assert not b.named("TRANSACTION_TIMED_OUT"), "the healthy replica waited on the frozen one"
    finally:
        a.send(signal.SIGCONT)
    for w in (a, b):
        w.send(signal.SIGTERM)
        assert w.wait_exit() == 0
    effects = {
        r["job_key"]: r["n"]
        for r in db.execute("SELECT job_key, count(*) AS n FROM probe.effects GROUP BY 1")
    }
    assert effects == {old_key: 1, **{f"fresh{i}": 1 for i in range(FRESH)}}
    assert int(one(db, "SELECT count(*) FROM pgmq.q_q_probe")) == 0
    print(f"healthy replica done in {took_s:.1f} s; the frozen prune held key {old_key}")
