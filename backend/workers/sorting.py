"""Sorting a delivery before anything runs: each body decoded within the size limit, its
missing trace_id taken from its pgmq headers, and validated (an invalid one becomes a dead
letter, never retried), the first message of each
key run together with the delivery or alone, later messages of a key set aside as its
copies."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from backend.db import queries as q
from backend.db.ledger import DeadLetter
from backend.errors import InvalidEnvelope, PayloadTooLarge, UndecodableMessage, describe
from backend.jobs import validate_envelope
from backend.workers.records import Delivery, Pending

_PREVIEW_CHARS = 120
# Bodies decoded together (``_decode_together``) only while their texts add up to at most
# this: beyond it the joined copy would cost more memory than the calls it saves.
_TOGETHER_MAX_CHARS = 1 << 20


def sort_delivery(
    messages: Sequence[q.Message], max_bytes: int, runs_together: Callable[[q.Message], bool]
) -> Delivery:
    """Invalid messages become dead letters; the first message of each key runs together
    with the rest of the delivery or alone (``runs_together``); later ones are its copies."""
    out = Delivery()
    seen: set[str] = set()
    bodies = _decode_together(messages, max_bytes)
    for msg in messages:
        try:
            body = bodies[msg.msg_id] if msg.msg_id in bodies else decode(msg, max_bytes)
            if msg.trace is not None and type(body) is dict and body.get("trace_id") is None:
                body["trace_id"] = msg.trace  # the producer's trace header; its own trace_id wins
            envelope = validate_envelope(body, max_bytes=max_bytes, size=msg.size)
        except InvalidEnvelope as exc:
            out.letters.append(
                DeadLetter(
                    msg_id=msg.msg_id, job_key=None, error=str(exc), error_type=type(exc).__name__, attempts=0
                )
            )
            continue
        key = envelope["idempotency_key"]
        if key in seen:
            out.copies.setdefault(key, []).append(msg.msg_id)
            continue
        seen.add(key)
        (out.together if runs_together(msg) else out.alone).append(Pending(key, msg.msg_id, envelope))
    return out


def _decode_together(messages: Sequence[q.Message], max_bytes: int) -> dict[int, Any]:
    """Msg id -> body of the delivery's bodies within the size limit, decoded in one call
    as one JSON array: a hundred small envelopes cost less than half of a call each.

    Each text is a jsonb value's output, one JSON value, so joined with commas inside
    brackets they are an array of as many values. When the decoder rejects the array (one
    body too deep or with too long a number), the answer is empty and every body is
    decoded on its own (``decode``), which names the one at fault. A delivery of large
    bodies is decoded one by one too, never copied into one string of their total size."""
    fitting = [m for m in messages if m.text is not None and m.size <= max_bytes]
    texts = [m.text for m in fitting if m.text is not None]
    if not texts or sum(map(len, texts)) > _TOGETHER_MAX_CHARS:
        return {}
    try:
        values = json.loads("[" + ",".join(texts) + "]")
    except (ValueError, RecursionError, MemoryError):
        return {}
    if len(values) != len(texts):  # not one value per text: leave it to ``decode``
        return {}
    return {m.msg_id: value for m, value in zip(fitting, values, strict=True)}


def decode(msg: q.Message, max_bytes: int) -> Any:
    """The body as a Python value; raise ``InvalidEnvelope`` when it is too large or the
    decoder rejects it (nesting deeper than its recursion limit, a number with more digits
    than Python converts, ...)."""
    if msg.too_large(max_bytes):
        raise PayloadTooLarge(
            f"body is {msg.size} bytes, over WORKER_MAX_PAYLOAD_BYTES ({max_bytes});"
            f" it starts {_preview(msg.text)}"
        )
    if msg.text is None:
        return None
    try:
        return json.loads(msg.text)
    except (ValueError, RecursionError, MemoryError) as exc:
        raise UndecodableMessage(
            f"body cannot be decoded ({type(exc).__name__}: {describe(exc)}); it starts {_preview(msg.text)}"
        ) from None


def _preview(text: str | None) -> str:
    if not text:
        return "empty"
    return repr(text[:_PREVIEW_CHARS]) + ("..." if len(text) > _PREVIEW_CHARS else "")
