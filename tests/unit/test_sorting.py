"""Sorting a delivery: bodies decoded together, and one by one when one of them is bad."""

from __future__ import annotations

import json
from typing import Any

from backend.db.queries import Message
from backend.workers.sorting import sort_delivery

MAX_BYTES = 262_144


def envelope(key: str, **payload: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "entity_type": "judgment",
        "entity_id": "1",
        "org_id": "org-1",
        "payload": payload,
        "trace_id": None,
    }


def message(msg_id: int, text: str | None, *, delivered_before: bool = False) -> Message:
    size = len(text.encode()) if text is not None else 0
    return Message(msg_id, text, size, delivered_before)


def messages_of(*bodies: Any) -> list[Message]:
    return [message(i, json.dumps(body)) for i, body in enumerate(bodies, start=1)]


def test_bodies_decoded_together_are_the_bodies_decoded_one_by_one() -> None:
    bodies = [
        envelope("a", n=1, text="x,y]", nested={"list": [1, 2, {"z": None}]}),
        envelope("b", big=2**70, f=1.5e-300, s='\u00e9\U0001f600 \\ "'),
        envelope("c"),
    ]
    delivery = sort_delivery(messages_of(*bodies), MAX_BYTES, lambda m: True)
    assert delivery.letters == []
    assert delivery.together == [(body["idempotency_key"], i, body) for i, body in enumerate(bodies, start=1)]


def test_an_undecodable_body_is_dead_lettered_and_the_others_are_decoded() -> None:
    nested = '{"a": ' + "[" * 5_000 + "]" * 5_000 + "}"
    huge_number = '{"n": ' + "9" * 5_000 + "}"
    msgs = [
        message(1, json.dumps(envelope("a"))),
        message(2, nested),
        message(3, json.dumps(envelope("b"))),
        message(4, huge_number),
        message(5, None),
        message(6, json.dumps(envelope("c"))),
    ]
    delivery = sort_delivery(msgs, MAX_BYTES, lambda m: True)
    assert [p.msg_id for p in delivery.together] == [1, 3, 6]
    letters = {letter.msg_id: letter for letter in delivery.letters}
    assert sorted(letters) == [2, 4, 5]
    assert letters[2].error_type == letters[4].error_type == "UndecodableMessage"
    assert "RecursionError" in letters[2].error
    assert "digits" in letters[4].error
    assert letters[5].error == "envelope must be a JSON object, got null"


def test_an_oversized_body_is_dead_lettered_by_its_size_and_the_others_are_decoded() -> None:
    prefix = json.dumps(envelope("big", blob="x" * 300))[:200]
    msgs = [
        message(1, json.dumps(envelope("a"))),
        Message(2, prefix, MAX_BYTES + 1, False),  # only a prefix of it was fetched
        message(3, json.dumps(envelope("b")), delivered_before=True),
    ]
    delivery = sort_delivery(msgs, MAX_BYTES, lambda m: not m.delivered_before)
    assert [p.msg_id for p in delivery.together] == [1]
    assert [p.msg_id for p in delivery.alone] == [3]
    [letter] = delivery.letters
    assert (letter.msg_id, letter.error_type) == (2, "PayloadTooLarge")
    assert f"body is {MAX_BYTES + 1} bytes" in letter.error


def test_copies_of_a_key_after_its_first_message_are_set_aside() -> None:
    msgs = messages_of(envelope("a"), envelope("b"), envelope("a"))
    delivery = sort_delivery(msgs, MAX_BYTES, lambda m: True)
    assert [p.msg_id for p in delivery.together] == [1, 2]
    assert delivery.copies == {"a": [3]}


def test_a_trace_from_the_headers_fills_a_missing_trace_id_only() -> None:
    own = {**envelope("own"), "trace_id": "mine"}
    bodies = [envelope("missing"), own, [1, 2]]
    msgs = [m._replace(trace="from-headers") for m in messages_of(*bodies)]
    delivery = sort_delivery(msgs, MAX_BYTES, lambda m: True)
    assert [(p.key, p.envelope["trace_id"]) for p in delivery.together] == [
        ("missing", "from-headers"),
        ("own", "mine"),
    ]
    assert [d.error_type for d in delivery.letters] == ["InvalidEnvelope"]
