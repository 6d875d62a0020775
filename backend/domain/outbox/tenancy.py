"""The outbox's tenant check: a notification about a recorded event (escalation's
recommendations carry it in ``payload.data.event``) is sent only for the organisation that
owns the event's case."""

from __future__ import annotations

from typing import Any

import psycopg

from backend.errors import PermanentJobError, TenantMismatch
from backend.jobs import Job

_EVENT_ORG = """
SELECT c.org_id FROM dragonfly.enforcement_events AS e
JOIN dragonfly.enforcement_cases AS c ON c.id = e.case_id WHERE e.id = %s
"""


def check_tenant(conn: psycopg.Connection[Any], job: Job) -> None:
    """Raise ``TenantMismatch`` when the event the notification is about belongs to another
    organisation than the job's ``org_id``. A notification about no event is not checked."""
    data = job.payload.get("data")
    event = data.get("event") if isinstance(data, dict) else None
    if not isinstance(event, dict) or event.get("id") is None:
        return
    try:
        event_id = int(event["id"])
    except (TypeError, ValueError):
        raise PermanentJobError(f"payload.data.event.id {event['id']!r} is not an event id") from None
    row = conn.execute(_EVENT_ORG, (event_id,)).fetchone()
    owner = _get(row) if row is not None else event.get("org_id")
    if owner is not None and owner != job.org_id:
        raise TenantMismatch(
            f"event {event_id} belongs to another organisation than the job's org_id; not sent"
        )


def _get(row: Any) -> Any:
    return row["org_id"] if isinstance(row, dict) else row[0]
