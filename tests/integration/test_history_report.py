"""The HTML report's history, on seeded rows: every series counts what the tables hold
in the window, and the document is self-contained."""

from __future__ import annotations

from typing import Any

import psycopg

from tools.worker_inspector.history import bucket_for, read_history
from tools.worker_inspector.html import render_html
from tools.worker_inspector.model import Options
from tools.worker_inspector.report import build_report

Conn = psycopg.Connection[Any]


def seed(db: Conn) -> None:
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts, completed_at,"
        " updated_at) SELECT 'c' || i, 'q_collectability', i, 'completed', 1,"
        " now() - i * interval '1 minute', now() FROM generate_series(1, 90) i"
    )
    db.execute(
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts, updated_at)"
        " SELECT 'f' || i, 'q_escalation', i, 'failed', 1, now() - i * interval '5 minutes'"
        " FROM generate_series(1, 4) i"
    )
    db.execute(  # outside a 2-hour window: not counted
        "INSERT INTO workers.processed_jobs (job_key, queue_name, msg_id, status, attempts, completed_at)"
        " VALUES ('old', 'q_collectability', 1, 'completed', 1, now() - interval '3 hours')"
    )
    db.execute(
        "INSERT INTO workers.dead_letters (queue_name, msg_id, job_key, error, error_type)"
        " VALUES ('q_outbox_processor', 1, 'd1', 'boom', 'RuntimeError')"
    )
    db.execute(
        "INSERT INTO workers.queue_samples (queue_name, sampled_at, depth, in_flight, oldest_age_s)"
        " SELECT 'q_collectability', date_trunc('minute', now()) - m * interval '1 minute', m, 0, m * 2"
        " FROM generate_series(0, 29) m"
    )
    db.execute(
        "INSERT INTO workers.heartbeats (worker_id, worker_name, queue_name, status, hostname, pid, version,"
        " started_at, last_heartbeat_at, stopped_at) VALUES"
        " ('w-1', 'q_collectability', 'q_collectability', 'STOPPED', 'h', 1, 'v', now() - interval '1 hour',"
        " now() - interval '30 minutes', now() - interval '30 minutes'),"
        " ('w-2', 'q_collectability', 'q_collectability', 'RUNNING', 'h', 2, 'v',"
        " now() - interval '20 minutes', now(), NULL)"
    )


def test_the_history_counts_what_the_window_holds(db: Conn) -> None:
    seed(db)
    h = read_history(db, 7200)
    assert h.bucket_s == bucket_for(7200) == 60
    assert sum(v for _, v in h.completed["q_collectability"]) == 90
    assert sum(v for _, v in h.failing["q_escalation"]) == 4
    assert sum(v for _, v in h.dead_letters["q_outbox_processor"]) == 1
    assert len(h.depth["q_collectability"]) == 30 and max(v for _, v in h.depth["q_collectability"]) == 29
    assert [i["worker_id"] for i in h.instances] == ["w-1", "w-2"]


def test_the_document_is_self_contained_and_every_chart_has_its_data(db: Conn) -> None:
    seed(db)
    options = Options(
        stale_after_s=60,
        dead_after_s=180,
        since_s=86400,
        max_age_s=600,
        show_all=False,
        stuck_limit=20,
        statement_timeout_s=10,
    )
    page = render_html(build_report(db, options, database="db"), read_history(db, 7200))
    assert page.startswith("<!doctype html>") and "<script" not in page
    assert "http://" not in page and "https://" not in page and "@import" not in page
    assert page.count('<svg class="chart') == 6
    assert 'data-series="1" data-points="90"' in page  # 90 jobs over 90 minutes: a bucket each
    assert 'data-series="1" data-points="30"' in page  # the depth samples
