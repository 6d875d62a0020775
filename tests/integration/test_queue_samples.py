"""Queue samples: one row per queue and interval however many replicas sample, and a
replica that comes second in an interval does not scan the queue."""

from __future__ import annotations

from typing import Any

import psycopg

from backend.db import queries as q
from backend.enqueue import build_envelope, enqueue_many

Conn = psycopg.Connection[Any]


def test_three_replicas_write_one_sample_per_interval(db: Conn, clean_db: str) -> None:
    enqueue_many(
        db,
        "q_collectability",
        [build_envelope(entity_type="judgment", entity_id=str(n), org_id="o") for n in range(5)],
    )
    replicas = [psycopg.connect(clean_db, autocommit=True) for _ in range(3)]
    try:
        wrote = [q.sample_queue(c, "q_collectability", 3600) for c in replicas]
    finally:
        for c in replicas:
            c.close()
    assert wrote == [True, False, False]
    rows = db.execute("SELECT depth, in_flight, oldest_age_s FROM workers.queue_samples").fetchall()
    assert len(rows) == 1 and rows[0]["depth"] == 5 and rows[0]["in_flight"] == 0
    assert rows[0]["oldest_age_s"] >= 0


def test_a_sampled_interval_is_not_scanned_again(db: Conn) -> None:
    q.sample_queue(db, "q_collectability", 3600)
    plan = db.execute(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + q._SAMPLE.format(table=q.queue_table("q_collectability")),
        {"q": "q_collectability", "i": 3600, "t": q.queue_table("q_collectability"), "cap": q._COUNT_CAP},
    ).fetchone()
    text = str(plan)
    # The one-time filter is false: the queue's scan is never executed.
    assert "'One-Time Filter'" in text and "'Actual Loops': 0" in text, text


def test_a_queue_larger_than_the_count_cap_gets_the_planner_s_estimate(db: Conn, monkeypatch: Any) -> None:
    enqueue_many(
        db,
        "q_collectability",
        [build_envelope(entity_type="judgment", entity_id=str(n), org_id="o") for n in range(3)],
    )
    db.execute("ANALYZE pgmq.q_q_collectability")  # the estimate: 3 rows
    monkeypatch.setattr(q, "_COUNT_CAP", 1)  # counting stops at 2 rows scanned
    assert q.sample_queue(db, "q_collectability", 3600)
    row = db.execute("SELECT depth, in_flight, oldest_age_s FROM workers.queue_samples").fetchone()
    assert row["depth"] == 3 and row["in_flight"] == 0 and row["oldest_age_s"] >= 0
    assert q.queue_depth(db, "q_collectability") == 3
    monkeypatch.setattr(q, "_COUNT_CAP", 100)
    assert q.queue_depth(db, "q_collectability") == 3
