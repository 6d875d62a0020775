"""Outbound delivery for the outbox worker: generic webhook, Slack, Discord and email.

``config`` reads the ``OUTBOX_*`` variables, ``message`` validates a job's payload,
``webhooks`` and ``mail`` send it; ``deliver_job`` is what the worker calls.

Nothing is reported delivered unless the receiver accepted it. Failures are classified:
``PermanentJobError`` (dead-lettered at once) when retrying cannot help, ``DeliveryError``
(retried with backoff) when it may. Errors and receipts name an HTTP destination as
``scheme://host`` only, because webhook paths carry the tokens that authorise them.
"""

from __future__ import annotations

from backend.domain.outbox.config import (
    CHANNELS,
    ENABLING_VARIABLES,
    OUTBOX_VARIABLES,
    Channel,
    OutboxConfig,
    redact_url,
    setting_hint,
)
from backend.domain.outbox.mail import send_email
from backend.domain.outbox.message import (
    DeliveryError,
    DeliveryReceipt,
    EntityRef,
    OutboundMessage,
    check_key,
    parse_message,
    stable_message_id,
)
from backend.domain.outbox.tenancy import check_tenant
from backend.domain.outbox.webhooks import http_document, post_json
from backend.errors import PermanentJobError
from backend.jobs import Job

__all__ = [
    "CHANNELS",
    "ENABLING_VARIABLES",
    "OUTBOX_VARIABLES",
    "Channel",
    "DeliveryError",
    "DeliveryReceipt",
    "EntityRef",
    "OutboundMessage",
    "OutboxConfig",
    "check_tenant",
    "deliver",
    "deliver_job",
    "parse_message",
    "redact_url",
    "stable_message_id",
]


def deliver(
    message: OutboundMessage, *, idempotency_key: str, config: OutboxConfig, entity: EntityRef | None = None
) -> DeliveryReceipt:
    """Send ``message`` on its channel and return the receiver's answer."""
    check_key(idempotency_key)
    if message.channel not in CHANNELS:
        raise PermanentJobError(f"unknown channel {message.channel!r}")
    if not config.is_configured(message.channel):
        raise PermanentJobError(
            f"channel {message.channel} is not configured: set {setting_hint(message.channel)}"
        )
    if message.channel == "email":
        return send_email(message, idempotency_key, config)
    document = http_document(message, idempotency_key, entity)
    return post_json(
        message.channel,
        config.url_for(message.channel) or "",
        document,
        idempotency_key,
        config.http_timeout_s,
    )


def deliver_job(job: Job, *, config: OutboxConfig) -> DeliveryReceipt:
    """Parse the job's payload and deliver it under the job's idempotency key."""
    entity = EntityRef(entity_type=job.entity_type, entity_id=job.entity_id, org_id=job.org_id)
    return deliver(
        parse_message(job.payload), idempotency_key=job.idempotency_key, config=config, entity=entity
    )
