"""Enqueue jobs from application code, on the caller's connection (and transaction).

Because pgmq lives in the same database, enqueueing inside a business transaction is a
transactional outbox: the job exists if and only if the transaction commits.

    python -m backend.enqueue q_collectability --entity-id 42 --org-id org-1 \
        [--key KEY] [--payload '{"k": 1}'] [--delay 10]
    python -m backend.enqueue q_collectability --org-id org-1 --file jobs.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
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
    conn: psycopg.Connection[Any], queue: str, envelopes: Sequence[Mapping[str, Any]], *, delay_s: int = 0
) -> list[int]:
    """Send several envelopes in one round trip (``pgmq.send_batch``)."""
    for envelope in envelopes:
        validate_envelope(envelope, max_bytes=DEFAULT_MAX_BYTES)
    rows = conn.execute(
        "SELECT * FROM pgmq.send_batch(%s, %s::jsonb[], %s)",
        (queue, [Jsonb(dict(e)) for e in envelopes], int(delay_s)),
    ).fetchall()
    return [int(r["send_batch"] if isinstance(r, dict) else r[0]) for r in rows]


_EPILOG = """queues and the entity each expects (--entity-type defaults to it):
  q_collectability    judgment (entity id: a dragonfly.judgments id)
  q_escalation        enforcement_case (entity id: a dragonfly.enforcement_cases id)
  q_outbox_processor  notification (payload: channel, subject, body, and to for email)

--file: one JSON object a line, either a whole envelope or a job with some fields left
out: {"entity_id": "42", "org_id": "org-1", "key": "judgment-42-score", "payload": {}}.
entity_type and org_id default to --entity-type (or the queue's) and --org-id; key
(or idempotency_key) to a new UUID. Bad lines are reported by number and not sent; the
others are sent in batches of --batch. Exit 0 when every line was sent, 1 otherwise.
"""


def main(argv: list[str] | None = None) -> int:
    from backend.config import ENTITY_TYPES, load_settings
    from backend.db.connect import connect, resolve_db_url
    from backend.dburl import secrets_of
    from backend.errors import ConfigError, describe

    parser = argparse.ArgumentParser(
        prog="python -m backend.enqueue",
        description="Enqueue one job for a worker, or many from a file (--file).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("queue", choices=QUEUES, help="the worker's queue")
    parser.add_argument(
        "--entity-type", help="what the job is about (default: the queue's entity, listed below)"
    )
    parser.add_argument("--entity-id", help="which one (required without --file)")
    parser.add_argument("--org-id", help="the organisation it belongs to (required without --file)")
    parser.add_argument("--key", help="idempotency key: a second job with it is not run (default: a UUID)")
    parser.add_argument("--payload", default="{}", help="JSON object given to the handler")
    parser.add_argument(
        "--trace-id", help="correlation id kept in the envelope, for the handler (Job.trace_id)"
    )
    parser.add_argument("--delay", type=int, default=0, help="seconds before the job(s) become visible")
    parser.add_argument("--file", help="JSON lines file of jobs or envelopes; - reads stdin")
    parser.add_argument("--batch", type=int, default=500, help="jobs per round trip with --file")
    args = parser.parse_args(argv)
    entity_type = args.entity_type or ENTITY_TYPES.get(args.queue)
    if args.file is None and not (args.entity_id and args.org_id):
        parser.error("--entity-id and --org-id are required without --file")
    try:
        settings = load_settings(lenient=True)
        for warning in settings.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.file is not None:
            return _enqueue_file(args, entity_type, connect, resolve_db_url(settings))
        envelope = build_envelope(
            entity_type=entity_type or "",
            entity_id=args.entity_id,
            org_id=args.org_id,
            payload=json.loads(args.payload),
            idempotency_key=args.key,
            trace_id=args.trace_id,
        )
        with connect(resolve_db_url(settings), "dragonfly-enqueue") as conn:
            msg_id = enqueue(conn, args.queue, envelope, delay_s=args.delay)
    except (OSError, json.JSONDecodeError, InvalidEnvelope, ConfigError, psycopg.Error) as exc:
        text = describe(exc)
        for secret in secrets_of(os.environ.get("SUPABASE_DB_URL")):
            text = text.replace(secret, "***")
        print(f"enqueue failed: {text}", file=sys.stderr)
        return 1
    print(json.dumps({"queue": args.queue, "msg_id": msg_id, "idempotency_key": envelope["idempotency_key"]}))
    return 0


def read_jobs(
    lines: Iterable[str], *, entity_type: str | None, org_id: str | None
) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Envelopes of the good lines, and (line number, why) of the bad ones; blank lines skip."""
    good: list[dict[str, Any]] = []
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise InvalidEnvelope(f"a line must be a JSON object, not {type(item).__name__}")
            good.append(
                build_envelope(
                    entity_type=item.get("entity_type") or entity_type or "",
                    entity_id=str(item.get("entity_id", "")),
                    org_id=item.get("org_id") or org_id or "",
                    payload=item.get("payload"),
                    idempotency_key=item.get("idempotency_key") or item.get("key"),
                    trace_id=item.get("trace_id"),
                )
            )
        except (json.JSONDecodeError, InvalidEnvelope, TypeError, ValueError) as exc:
            bad.append((number, str(exc)))
    return good, bad


def _enqueue_file(args: argparse.Namespace, entity_type: str | None, connect: Any, url: str) -> int:
    started = time.monotonic()
    if args.file == "-":
        good, bad = read_jobs(sys.stdin, entity_type=entity_type, org_id=args.org_id)
    else:
        with open(args.file, encoding="utf-8") as handle:
            good, bad = read_jobs(handle, entity_type=entity_type, org_id=args.org_id)
    for number, why in bad:
        print(f"{args.file}:{number}: not sent: {why}", file=sys.stderr)
    bar = _ProgressBar(len(good)) if sys.stderr.isatty() else None
    sent = 0
    try:
        with connect(url, "dragonfly-enqueue") as conn:
            for first in range(0, len(good), max(1, args.batch)):
                chunk = good[first : first + max(1, args.batch)]
                sent += len(enqueue_many(conn, args.queue, chunk, delay_s=args.delay))
                if bar:
                    bar.show(sent)
    except psycopg.Error:
        # Each batch commits on its own: say how far it got, so a rerun can start after it.
        if bar:
            bar.done()
        print(
            f"{args.file}: {sent:,} of {len(good):,} jobs were sent before the failure below", file=sys.stderr
        )
        raise
    if bar:
        bar.done()
    summary = {
        "queue": args.queue,
        "sent": sent,
        "bad_lines": [n for n, _ in bad],
        "seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary))
    return 1 if bad else 0


class _ProgressBar:
    """One line on a terminal's stderr, redrawn after each batch."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width = total, width

    def show(self, done: int) -> None:
        filled = self.width * done // max(1, self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done:,}/{self.total:,} jobs")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")


if __name__ == "__main__":
    raise SystemExit(main())
