"""The HTTP channels: generic webhook, Slack and Discord, sent with the job's
``Idempotency-Key`` header; redirects are never followed."""

from __future__ import annotations

import http.client
import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import IO, Any

from backend import __version__
from backend.domain.outbox.config import URL_VARIABLES, Channel, redact_url
from backend.domain.outbox.message import (
    DISCORD_MAX_CONTENT,
    RETRYABLE_4XX,
    DeliveryError,
    DeliveryReceipt,
    EntityRef,
    OutboundMessage,
    network_reason,
    stable_message_id,
)
from backend.errors import PermanentJobError, WorkerError

# The answers whose Retry-After says when to come back (RFC 9110).
_RETRY_AFTER_CODES = frozenset({429, 503})

# --- HTTP channels ---------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Following a redirect turns a POST into a body-less GET: a delivery that did not
    # happen would look like a success. The 3xx surfaces as an HTTPError instead.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def http_document(message: OutboundMessage, key: str, entity: EntityRef | None) -> dict[str, Any]:
    """The JSON a channel receives: Slack's and Discord's shapes, or the generic document."""
    if message.channel == "slack":
        return {"text": f"*{message.subject}*\n{message.body}"}
    if message.channel == "discord":
        content = f"**{message.subject}**\n{message.body}"
        if len(content) > DISCORD_MAX_CONTENT:
            content = content[: DISCORD_MAX_CONTENT - 1] + "…"
        # Text from case data must not ping @everyone or roles.
        return {"content": content, "allowed_mentions": {"parse": []}}
    document: dict[str, Any] = {
        "idempotency_key": key,
        "message_id": stable_message_id(key),
        "channel": message.channel,
        "subject": message.subject,
        "body": message.body,
        "data": dict(message.data) if message.data is not None else None,
    }
    if entity is not None:
        document.update(entity_type=entity.entity_type, entity_id=entity.entity_id, org_id=entity.org_id)
    return document


def post_json(
    channel: Channel, url: str, document: Mapping[str, Any], key: str, timeout_s: float
) -> DeliveryReceipt:
    """POST ``document`` with the key's ``Idempotency-Key``; the status line is the verdict."""
    destination = redact_url(url)
    request = urllib.request.Request(
        url,
        data=json.dumps(document).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "User-Agent": f"dragonfly-outbox/{__version__}",
        },
    )
    try:
        # The status line is the receiver's verdict; the body is not needed.
        with _OPENER.open(request, timeout=timeout_s) as response:
            status, reason = int(response.status), str(response.reason)
    except urllib.error.HTTPError as exc:
        raise _http_failure(channel, destination, exc) from None
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(
            f"{channel} delivery to {destination} failed: {network_reason(exc, timeout_s)};"
            " a later attempt may succeed"
        ) from None
    return DeliveryReceipt(
        channel=channel,
        destination=destination,
        status=status,
        response=reason,
        message_id=stable_message_id(key),
    )


def _http_failure(channel: Channel, destination: str, exc: urllib.error.HTTPError) -> WorkerError:
    try:
        detail = exc.read(200).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        detail = ""
    finally:
        exc.close()
    text = f"{channel} delivery to {destination} got HTTP {exc.code}"
    text += f" ({detail})" if detail else ""
    if exc.code >= 500 or exc.code in RETRYABLE_4XX:
        asked = _retry_after(exc.headers.get("Retry-After")) if exc.code in _RETRY_AFTER_CODES else None
        return DeliveryError(f"{text}; a later attempt may succeed", retry_after_s=asked)
    if 300 <= exc.code < 400:
        return PermanentJobError(
            f"{text}: redirects are not followed; set {URL_VARIABLES[channel]} to the final URL"
        )
    return PermanentJobError(f"{text}: the receiver rejected the message")


def _retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds, or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
