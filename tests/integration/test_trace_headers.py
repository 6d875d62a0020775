"""pgmq headers fill a job's trace_id (pgmq 1.5 and later): a W3C ``traceparent``'s trace-id,
else ``x-trace-id``; an envelope's own trace_id wins; a table without headers reads as before."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from backend.db import queries as q
from backend.workers.sorting import sort_delivery

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def body(key: str, **extra: Any) -> str:
    return json.dumps(
        {
            "idempotency_key": key,
            "entity_type": "probe",
            "entity_id": 1,
            "org_id": "o",
            "payload": {},
            **extra,
        }
    )


@pytest.mark.parametrize("read", ["lock", "fetch"])
def test_a_trace_header_fills_the_envelope_s_missing_trace_id(db: psycopg.Connection[Any], read: str) -> None:
    sends = [
        ("traceparent", body("a"), {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}),
        ("x-trace-id", body("b"), {"x-trace-id": "plain-id"}),
        ("own", body("c", trace_id="mine"), {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}),
        ("malformed", body("d"), {"traceparent": "not-a-traceparent"}),
        ("none", body("e"), None),
    ]
    for _, text, headers in sends:
        db.execute(
            "SELECT pgmq.send('q_probe', %s::jsonb, %s::jsonb, 0)",
            (text, json.dumps(headers) if headers else None),
        )
    assert q.detect_headers(db, "q_probe")
    with db.transaction():
        if read == "lock":
            messages = q.lock_messages(db, "q_probe", qty=10, max_bytes=10_000, limit_ms=5_000, headers=True)
        else:
            messages = q.fetch_messages(db, "q_probe", qty=10, vt_s=5, max_bytes=10_000, headers=True)
    assert [m.trace for m in messages] == [TRACE, "plain-id", TRACE, None, None]
    delivery = sort_delivery(messages, 10_000, lambda m: True)
    traces = [p.envelope.get("trace_id") for p in delivery.together]
    assert traces == [TRACE, "plain-id", "mine", None, None]


def test_a_queue_without_headers_is_read_without_them(db: psycopg.Connection[Any]) -> None:
    db.execute("SELECT pgmq.send('q_probe', %s::jsonb)", (body("a"),))
    db.execute("ALTER TABLE pgmq.q_q_probe RENAME COLUMN headers TO headers_hidden")
    try:
        assert not q.detect_headers(db, "q_probe")
        with db.transaction():
            messages = q.lock_messages(db, "q_probe", qty=10, max_bytes=10_000, limit_ms=5_000, headers=False)
        assert [json.loads(m.text or "null")["idempotency_key"] for m in messages] == ["a"]
    finally:
        db.execute("ALTER TABLE pgmq.q_q_probe RENAME COLUMN headers_hidden TO headers")
