"""Enqueue jobs from application code, on the caller's connection (and transaction).

Because pgmq lives in the same database, enqueueing inside a business transaction is a
transactional outbox: the job exists if and only if the transaction commits.

    python -m backend.enqueue q_collectability --entity-type judgment --entity-id 42 \
        --org-id org-1 [--key KEY] [--payload '{"k": 1}'] [--delay 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from backend.config import QUEUES
from backend.errors import InvalidEnvelope
from backend.jobs import validate_envelope

DEFAULT_MAX_BYTES = 262144


def build_envelope(
    *,
    entity_type: str,
    entity_id: str,
    org_id: str,
    payload: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
    trace_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, Any]:
    """A validated envelope; the key defaults to a fresh UUID (pass a stable one to dedupe)."""
    envelope: dict[str, Any] = {
        "idempotency_key": idempotency_key or str(uuid.uuid4()),
        "entity_type": entity_type,
        "entity_id": str(entity_id),
        "org_id": org_id,
        "payload": dict(payload or {}),
        "created_at": datetime.now(UTC).isoformat(),
    }
    if trace_id:
        envelope["trace_id"] = trace_id
    return validate_envelope(envelope, max_bytes=max_bytes)


def enqueue(
    conn: psycopg.Connection[Any], queue: str, envelope: Mapping[str, Any], *, delay_s: int = 0
) -> int:
    """Send one envelope to ``queue`` on ``conn``; returns the pgmq message id."""
    validate_envelope(envelope, max_bytes=DEFAULT_MAX_BYTES)
    row = conn.execute(
        "SELECT pgmq.send(%s, %s, %s) AS msg_id", (queue, Jsonb(dict(envelope)), int(delay_s))
    ).fetchone()
    assert row is not None
    return int(row["msg_id"] if isinstance(row, dict) else row[0])


def enqueue_many(
    conn: psycopg.Connection[Any], queue: str, envelopes: list[Mapping[str, Any]], *, delay_s: int = 0
) -> list[int]:
    """Send several envelopes in one round trip (``pgmq.send_batch``)."""
    for envelope in envelopes:
        validate_envelope(envelope, max_bytes=DEFAULT_MAX_BYTES)
    rows = conn.execute(
        "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[], %s)",
        (queue, [Jsonb(dict(e)) for e in envelopes], int(delay_s)),
    ).fetchall()
    return [int(r["send_batch"] if isinstance(r, dict) else r[0]) for r in rows]


def main(argv: list[str] | None = None) -> int:
    from backend.config import load_settings
    from backend.db.connect import connect, resolve_db_url
    from backend.dburl import secrets_of
    from backend.errors import ConfigError, describe

    parser = argparse.ArgumentParser(
        prog="python -m backend.enqueue", description="Enqueue one job for a worker."
    )
    parser.add_argument("queue", choices=QUEUES)
    parser.add_argument("--entity-type", required=True)
    parser.add_argument("--entity-id", required=True)
    parser.add_argument("--org-id", required=True)
    parser.add_argument("--key", help="idempotency key (default: a new UUID)")
    parser.add_argument("--payload", default="{}", help="JSON object")
    parser.add_argument("--trace-id")
    parser.add_argument("--delay", type=int, default=0, help="seconds before it is visible")
    args = parser.parse_args(argv)
    try:
        payload = json.loads(args.payload)
        envelope = build_envelope(
            entity_type=args.entity_type,
            entity_id=args.entity_id,
            org_id=args.org_id,
            payload=payload,
            idempotency_key=args.key,
            trace_id=args.trace_id,
        )
        settings = load_settings(lenient=True)
        for warning in settings.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        with connect(resolve_db_url(settings), "dragonfly-enqueue") as conn:
            msg_id = enqueue(conn, args.queue, envelope, delay_s=args.delay)
    except (json.JSONDecodeError, InvalidEnvelope, ConfigError, psycopg.Error) as exc:
        text = describe(exc)
        for secret in secrets_of(os.environ.get("SUPABASE_DB_URL")):
            text = text.replace(secret, "***")
        print(f"enqueue failed: {text}", file=sys.stderr)
        return 1
    print(json.dumps({"queue": args.queue, "msg_id": msg_id, "idempotency_key": envelope["idempotency_key"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
