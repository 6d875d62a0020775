"""An outbox job's message: its validation, the receipt of a delivery, and the error of one
that may succeed later."""

from __future__ import annotations

import hashlib
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backend.domain.outbox.config import CHANNELS, Channel, is_address
from backend.errors import PermanentJobError, RetryableError

DISCORD_MAX_CONTENT = 2000
MAX_SUBJECT_LENGTH = 998  # RFC 5322 line limit; longer subjects cannot travel as one header
RETRYABLE_4XX = frozenset({408, 429})
_MESSAGE_FIELDS = frozenset({"channel", "subject", "body", "to", "data"})


class DeliveryError(RetryableError):
    """A delivery that may succeed later (5xx, 408, 429, timeout, connection or SMTP 4xx).

    ``retry_after_s`` carries the receiver's ``Retry-After`` of a 429 or 503.
    """


@dataclass(frozen=True, kw_only=True)
class OutboundMessage:
    """A validated outbox payload."""

    channel: Channel
    subject: str
    body: str
    to: str | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class EntityRef:
    """The case a message is about; sent along with generic webhooks."""

    entity_type: str
    entity_id: str
    org_id: str


@dataclass(frozen=True, kw_only=True)
class DeliveryReceipt:
    """What the receiver answered: HTTP status or SMTP reply code and text."""

    channel: Channel
    destination: str
    status: int
    response: str
    message_id: str


def parse_message(payload: Any) -> OutboundMessage:
    """Validate a job's payload; raise ``PermanentJobError`` saying what is wrong."""
    if not isinstance(payload, Mapping):
        raise PermanentJobError(f"outbox payload must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in set(payload) - _MESSAGE_FIELDS)
    if unknown:
        raise PermanentJobError(
            f"outbox payload has unknown field(s): {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_MESSAGE_FIELDS))}"
        )
    channel = payload.get("channel")
    if channel not in CHANNELS:
        raise PermanentJobError(f"unknown channel {channel!r}; use one of {', '.join(CHANNELS)}")
    data = payload.get("data")
    if data is not None and not isinstance(data, Mapping):
        raise PermanentJobError("data must be a JSON object when present")
    return OutboundMessage(
        channel=channel,
        subject=_subject(payload),
        body=_body(payload),
        to=_recipient(channel, payload.get("to")),
        data=data,
    )


def stable_message_id(idempotency_key: str) -> str:
    """The same Message-ID for every attempt of one key, so mail systems can deduplicate."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@dragonfly.outbox>"


# --- message validation ----------------------------------------------------------------


def _subject(payload: Mapping[str, Any]) -> str:
    subject = payload.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        raise PermanentJobError("subject must be a non-empty string")
    if "\r" in subject or "\n" in subject:
        raise PermanentJobError("subject must be one line (no CR or LF)")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise PermanentJobError(f"subject is longer than {MAX_SUBJECT_LENGTH} characters")
    return subject


def _body(payload: Mapping[str, Any]) -> str:
    body = payload.get("body")
    if not isinstance(body, str) or not body.strip():
        raise PermanentJobError("body must be a non-empty string")
    return body


def _recipient(channel: Channel, to: Any) -> str | None:
    if channel != "email":
        if to is not None:
            raise PermanentJobError(f"to is only for the email channel, not {channel}")
        return None
    if not isinstance(to, str) or not to.strip():
        raise PermanentJobError("to must be a non-empty string (the recipient) for email")
    if not is_address(to):
        raise PermanentJobError(f"to {to!r} is not one email address")
    return to


def check_key(key: str) -> None:
    # The key travels in an HTTP or mail header: printable ASCII only, one line.
    if not key or not key.isascii() or not key.isprintable():
        raise PermanentJobError(
            "idempotency_key must be printable ASCII to be sent in the Idempotency-Key header"
        )


def network_reason(exc: BaseException, timeout_s: float) -> str:
    """Why a connection failed, in a few words."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout_s:g}s"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(reason)
