"""The job envelope: its validation, and the Job built from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from backend.errors import InvalidEnvelope
from backend.jobs import Job, job_from_envelope, validate_envelope

ENVELOPE: dict[str, Any] = {
    "idempotency_key": "judgment-42-score",
    "entity_type": "judgment",
    "entity_id": "42",
    "org_id": "org-1",
    "payload": {"reason": "new"},
    "trace_id": "t-1",
    "created_at": "2026-11-29T10:00:00+00:00",
}


def test_a_job_from_an_envelope_is_the_job_its_init_would_build() -> None:
    """``job_from_envelope`` sets the fields without the dataclass's ``__init__``: every
    field must still be set, and equal to what ``Job(...)`` gives."""
    built = job_from_envelope(ENVELOPE, msg_id=7, queue_name="q_collectability", attempt=3)
    expected = Job(
        msg_id=7,
        queue_name="q_collectability",
        idempotency_key="judgment-42-score",
        entity_type="judgment",
        entity_id="42",
        org_id="org-1",
        payload={"reason": "new"},
        trace_id="t-1",
        created_at="2026-11-29T10:00:00+00:00",
        attempt=3,
    )
    assert built == expected
    assert {f.name: getattr(built, f.name) for f in dataclasses.fields(Job)} == dataclasses.asdict(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.attempt = 4  # type: ignore[misc]


def test_optional_fields_default_to_none_and_the_first_attempt() -> None:
    bare = {k: v for k, v in ENVELOPE.items() if k not in ("trace_id", "created_at")}
    built = job_from_envelope(bare, msg_id=1, queue_name="q")
    assert (built.trace_id, built.created_at, built.attempt) == (None, None, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"org_id": None}, "org_id must be a non-empty string or an integer, got null"),
        ({"entity_id": 42.0}, "entity_id must be a non-empty string or an integer, got non-integer number"),
        ({"org_id": True}, "org_id must be a non-empty string or an integer, got boolean"),
        ({"idempotency_key": 42}, "idempotency_key must be a non-empty string, got number"),
        ({"created_at": False}, r"created_at must be a string \(ISO 8601\) or epoch seconds, got boolean"),
        (
            {"created_at": 1.7e12},
            r"created_at 1700000000000.0 is out of range for epoch seconds \(milliseconds\?\)",
        ),
        ({"idempotency_key": "  "}, "idempotency_key must be a non-empty string, got string"),
        ({"idempotency_key": "k" * 513}, "idempotency_key is longer than 512 characters"),
        ({"payload": [1]}, "payload must be a JSON object, got array"),
        ({"trace_id": 5}, "trace_id must be a string, got number"),
    ],
)
def test_an_invalid_envelope_says_what_is_wrong(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidEnvelope, match=message):
        validate_envelope({**ENVELOPE, **change}, max_bytes=262_144, size=300)


def test_missing_fields_are_named_in_order() -> None:
    body = {k: v for k, v in ENVELOPE.items() if k not in ("entity_type", "payload")}
    with pytest.raises(InvalidEnvelope, match=r"missing field\(s\): entity_type, payload$"):
        validate_envelope(body, max_bytes=262_144, size=300)


def test_not_an_object_and_over_the_size_limit() -> None:
    with pytest.raises(InvalidEnvelope, match="envelope must be a JSON object, got array"):
        validate_envelope([ENVELOPE], max_bytes=262_144)
    with pytest.raises(InvalidEnvelope, match="envelope is 301 bytes, over the limit of 300"):
        validate_envelope(ENVELOPE, max_bytes=300, size=301)
    assert validate_envelope(ENVELOPE, max_bytes=300, size=300) is ENVELOPE


def test_integer_ids_become_their_decimal_text_whoever_sent_them() -> None:
    """A bigint from SQL and a number from JavaScript give the same envelope as text ids."""
    sent = validate_envelope({**ENVELOPE, "entity_id": 42, "org_id": 7}, max_bytes=262_144, size=300)
    assert (sent["entity_id"], sent["org_id"]) == ("42", "7")
    assert job_from_envelope(sent, msg_id=1, queue_name="q").integer_entity_id("judgment") == 42
    big = validate_envelope({**ENVELOPE, "entity_id": 2**63 - 1}, max_bytes=262_144, size=300)
    assert big["entity_id"] == "9223372036854775807"


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        (1764410400, "2025-11-29T10:00:00+00:00"),
        (1764410400.25, "2025-11-29T10:00:00.250000+00:00"),
        ("2026-11-29T10:00:00+00:00", "2026-11-29T10:00:00+00:00"),
    ],
)
def test_created_at_is_iso_text_or_epoch_seconds(sent: Any, stored: str) -> None:
    envelope = validate_envelope({**ENVELOPE, "created_at": sent}, max_bytes=262_144, size=300)
    assert envelope["created_at"] == stored
