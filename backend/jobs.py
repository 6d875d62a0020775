"""The job envelope (docs/ARCHITECTURE.md, "A job"), its validation, and the handler protocols."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from backend.errors import InvalidEnvelope, PermanentJobError

REQUIRED_TEXT_FIELDS = ("idempotency_key", "entity_type", "entity_id", "org_id")
OPTIONAL_TEXT_FIELDS = ("trace_id", "created_at")
# Ids a producer may send as JSON integers (a bigint from SQL, a number from JavaScript):
# normalised to their decimal text, so a key derived from them is the same whoever sent it.
INTEGER_ID_FIELDS = ("entity_id", "org_id")
MAX_KEY_LENGTH = 512
_REQUIRED_FIELDS = frozenset((*REQUIRED_TEXT_FIELDS, "payload"))


@dataclass(frozen=True, kw_only=True)
class Job:
    """One validated message: the envelope's fields plus delivery facts."""

    msg_id: int
    queue_name: str
    idempotency_key: str
    entity_type: str
    entity_id: str
    org_id: str
    payload: Mapping[str, Any]
    trace_id: str | None = None
    created_at: str | None = None
    attempt: int = 1

    def integer_entity_id(self, entity_type: str) -> int:
        """The entity id as an integer key, or a permanent error saying what is wrong."""
        if self.entity_type != entity_type:
            raise PermanentJobError(f"expected entity_type {entity_type!r}, got {self.entity_type!r}")
        try:
            return int(self.entity_id)
        except ValueError:
            raise PermanentJobError(f"entity_id must be an integer id, got {self.entity_id!r}") from None


def validate_envelope(body: Any, *, max_bytes: int, size: int | None = None) -> dict[str, Any]:
    """Return the envelope as a dict, or raise ``InvalidEnvelope`` saying what is wrong.

    What producers naturally send is normalised in place where a type check would otherwise
    fail (so an envelope of strings pays nothing for it): integer ids as their decimal text,
    ``created_at`` in epoch seconds as ISO 8601 text. ``size`` is the byte length of the
    body's JSON text when the caller has it."""
    envelope = _check_shape(body, max_bytes, size)
    for name in REQUIRED_TEXT_FIELDS:
        value = envelope[name]
        if not isinstance(value, str):
            if name not in INTEGER_ID_FIELDS or type(value) is not int:  # not a bool, not 42.0
                raise _not_text(name, value, "a non-empty string")
            envelope[name] = value = str(value)  # the same key whoever sent it
        if not value.strip():
            raise _not_text(name, value, "a non-empty string")
    if len(envelope["idempotency_key"]) > MAX_KEY_LENGTH:
        raise InvalidEnvelope(f"idempotency_key is longer than {MAX_KEY_LENGTH} characters")
    if not isinstance(envelope["payload"], dict):
        raise InvalidEnvelope(f"payload must be a JSON object, got {_json_type(envelope['payload'])}")
    for name in OPTIONAL_TEXT_FIELDS:
        value = envelope.get(name)
        if value is not None and not isinstance(value, str):
            if name != "created_at" or not _is_epoch(value):
                raise _not_text(name, value, "a string")
            envelope[name] = _epoch_text(value)
    return envelope


def _check_shape(body: Any, max_bytes: int, size: int | None) -> dict[str, Any]:
    """``body``, when it is a JSON object within the size limit with every required field."""
    if not isinstance(body, dict):
        raise InvalidEnvelope(f"envelope must be a JSON object, got {_json_type(body)}")
    if size is None:
        size = len(json.dumps(body, separators=(",", ":")).encode())
    if size > max_bytes:
        raise InvalidEnvelope(f"envelope is {size} bytes, over the limit of {max_bytes}")
    if not body.keys() >= _REQUIRED_FIELDS:
        missing = [name for name in (*REQUIRED_TEXT_FIELDS, "payload") if name not in body]
        raise InvalidEnvelope(f"missing field(s): {', '.join(missing)}")
    return body


def _not_text(name: str, value: Any, wanted: str) -> InvalidEnvelope:
    return InvalidEnvelope(f"{name} must be {wanted}{_ALSO_ACCEPTED.get(name, '')}, got {_json_type(value)}")


_ALSO_ACCEPTED = {name: " or an integer" for name in INTEGER_ID_FIELDS} | {
    "created_at": " (ISO 8601) or epoch seconds"
}
# Epoch seconds a datetime can hold (years 1 to 9999): beyond, the value is no time.
_EPOCH_RANGE = (-62_135_596_800, 253_402_300_799)


def _is_epoch(value: Any) -> bool:
    """A number that may be epoch seconds: not a bool, not NaN or infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _epoch_text(seconds: float) -> str:
    """Epoch seconds as ISO 8601 text in UTC; InvalidEnvelope when out of range."""
    if not _EPOCH_RANGE[0] <= seconds <= _EPOCH_RANGE[1]:
        raise InvalidEnvelope(f"created_at {seconds!r} is out of range for epoch seconds (milliseconds?)")
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def job_from_envelope(envelope: Mapping[str, Any], *, msg_id: int, queue_name: str, attempt: int = 1) -> Job:
    """The ``Job`` of a validated envelope.

    Built once per job on the hot path, so its fields are set in the instance's ``__dict__``
    directly: a frozen dataclass's ``__init__`` sets them one by one through
    ``object.__setattr__``, about a microsecond per job. The result is the same ``Job``
    (equal to one built with its ``__init__``; a test keeps it so when a field is added).
    """
    job = object.__new__(Job)
    vars(job).update(
        msg_id=msg_id,
        queue_name=queue_name,
        idempotency_key=envelope["idempotency_key"],
        entity_type=envelope["entity_type"],
        entity_id=envelope["entity_id"],
        org_id=envelope["org_id"],
        payload=envelope["payload"],
        trace_id=envelope.get("trace_id"),
        created_at=envelope.get("created_at"),
        attempt=attempt,
    )
    return job


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "non-integer number",
    }.get(type(value), type(value).__name__)
