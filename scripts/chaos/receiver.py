"""The outbox's receiver: how the webhook and Slack endpoint the outbox delivers to (a
``scripts.harness.receivers.HttpRecorder``) answers (``ChaosReplies``), and what the checks
read of each request it recorded (``Call``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scripts.harness.receivers import HttpRequest, HttpRequestRecord, Reply


@dataclass(frozen=True, kw_only=True)
class Call:
    """One request the receiver got: its Idempotency-Key, the status it chose, when it arrived."""

    key: str | None
    path: str
    status: int
    at: float  # epoch seconds
    caller_gone: bool = False  # the worker died while waiting for the (slow) reply

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    @classmethod
    def of(cls, record: HttpRequestRecord) -> Call:
        return cls(
            key=record.idempotency_key,
            path=record.path,
            status=record.status,
            at=record.received_at,
            caller_gone=record.caller_gone,
        )


class ChaosReplies:
    """How the outbox's webhook and Slack endpoint answers (the responder of the run's
    ``HttpRecorder``): 200, after the delay a notification's ``data.chaos.delay_s`` asks
    for, or 503 to the first ``data.chaos.fail_first`` calls of a key."""

    def __init__(self) -> None:
        self._seen: Counter[str] = Counter()

    def __call__(self, request: HttpRequest) -> Reply:
        hints = _hints(request.body)
        key = request.idempotency_key or ""
        self._seen[key] += 1
        if self._seen[key] <= int(hints.get("fail_first", 0)):
            return Reply(status=503)
        return Reply(status=200, delay_s=float(hints.get("delay_s", 0)))


def _hints(body: bytes) -> Mapping[str, Any]:
    try:
        document = json.loads(body)
        hints = (document.get("data") or {}).get("chaos") or {}
    except (ValueError, AttributeError):
        return {}
    return hints if isinstance(hints, dict) else {}
