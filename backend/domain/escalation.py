"""Escalation: recommend a case's next enforcement action from its facts, by one rules table.

``ESCALATION_RULES`` is data, stated identically in ``docs/DOMAIN_RULES.md``: the first row
whose conditions all hold decides the action and its confidence; the last row always holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from backend.domain.collectability import Condition, Tier, age_in_years, parse_when
from backend.domain.outbox import CHANNELS, Channel
from backend.enqueue import build_envelope, enqueue
from backend.errors import PermanentJobError

Action = Literal["garnishment", "levy", "skiptrace_refresh", "attorney_review"]
ACTIONS: tuple[Action, ...] = get_args(Action)
# Actions taken against the debtor; research (skip-trace) and reviews are not attempts.
ATTEMPT_EVENT_TYPES = ("garnishment", "levy")
# Events that count as activity on a case; a recommendation is advice, not activity.
ACTIVITY_EVENT_TYPES = (*ACTIONS, "payment")
ATTEMPT_WINDOW_DAYS = 30
OUTBOX_QUEUE = "q_outbox_processor"
_MAX_BIGINT = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class CaseFacts:
    """What escalation knows about a case; ``score``/``tier`` are None until it is scored."""

    case_id: int
    org_id: str
    judgment_id: int
    status: str
    score: int | None
    tier: Tier | None
    attempts_30d: int
    days_since_activity: int
    evidence_count: int
    judgment_age_years: int


ESCALATION_FACTS = (
    "status",
    "score",
    "tier",
    "attempts_30d",
    "days_since_activity",
    "evidence_count",
    "judgment_age_years",
)


@dataclass(frozen=True, kw_only=True)
class EscalationRule:
    """One row of the escalation table: when it holds, recommend ``action``."""

    rule: str
    action: Action
    confidence: float
    when: tuple[Condition, ...]
    why: str


def _row(rule: str, action: Action, confidence: float, when: str, why: str) -> EscalationRule:
    return EscalationRule(
        rule=rule, action=action, confidence=confidence, when=parse_when(when, ESCALATION_FACTS), why=why
    )


ESCALATION_RULES: tuple[EscalationRule, ...] = (
    _row(
        "inactive_case",
        "attorney_review",
        0.95,
        "status in paused,closed",
        "the case is not open: counsel decides whether to resume enforcement",
    ),
    _row(
        "old_judgment",
        "attorney_review",
        0.90,
        "judgment_age_years >= 10",
        "a judgment this old may need renewal before any enforcement",
    ),
    _row(
        "repeated_attempts",
        "attorney_review",
        0.80,
        "attempts_30d >= 3",
        "repeated enforcement within 30 days: review before another attempt",
    ),
    _row(
        "no_evidence",
        "skiptrace_refresh",
        0.85,
        "evidence_count < 1",
        "nothing on file to enforce against: locate employer and assets first",
    ),
    _row(
        "stale_leads",
        "skiptrace_refresh",
        0.70,
        "days_since_activity >= 90 and evidence_count < 3",
        "few leads and no recent activity: refresh the debtor's whereabouts",
    ),
    _row(
        "strong_levy",
        "levy",
        0.85,
        "score >= 85 and evidence_count >= 2 and attempts_30d < 2",
        "highly collectable with several assets on file: levy",
    ),
    _row(
        "garnish",
        "garnishment",
        0.75,
        "tier in A,B and evidence_count >= 1",
        "collectable judgment with a lead on file: garnish",
    ),
    _row(
        "garnish_low_tier",
        "garnishment",
        0.50,
        "tier in C and evidence_count >= 3",
        "low collectability but plenty of evidence: garnish",
    ),
    _row("fallback", "attorney_review", 0.40, "always", "no enforcement rule applies: counsel decides"),
)
if ESCALATION_RULES[-1].when:
    raise ValueError("the last escalation rule must always apply")


@dataclass(frozen=True, kw_only=True)
class Recommendation:
    """The next action for a case, how sure the rules are (0-1), and why."""

    action: Action
    confidence: float
    reasons: tuple[str, ...]
    rule: str


def recommend(facts: CaseFacts, rules: Sequence[EscalationRule] = ESCALATION_RULES) -> Recommendation:
    """The action of the first rule whose conditions all hold."""
    values = asdict(facts)
    rule = next(r for r in rules if all(c.holds(values) for c in r.when))
    reasons = [rule.why]
    reasons += [f"{c.fact} is {values[c.fact]} ({c})" for c in rule.when]
    if facts.score is None:
        reasons.append("the judgment has no collectability score yet")
    return Recommendation(
        action=rule.action, confidence=rule.confidence, reasons=tuple(reasons), rule=rule.rule
    )


_LOAD_FACTS = """
SELECT c.id, c.org_id, c.judgment_id, c.status, j.judgment_date, s.score, s.tier, t.as_of,
       greatest(c.last_activity_at, (
           SELECT max(e.created_at) FROM dragonfly.enforcement_events e
           WHERE e.case_id = c.id AND e.event_type = ANY(%(activity)s)
             AND e.created_at <= t.as_of)) AS last_activity_at,
       (SELECT count(*) FROM dragonfly.enforcement_events e
        WHERE e.case_id = c.id AND e.event_type = ANY(%(attempts)s)
          AND e.created_at > t.as_of - make_interval(days => %(window)s)
          AND e.created_at <= t.as_of) AS attempts_30d,
       (SELECT count(*) FROM dragonfly.evidence v
        WHERE v.case_id = c.id AND v.created_at <= t.as_of) AS evidence_count
FROM (SELECT coalesce(%(as_of)s::timestamptz, now()) AS as_of) t
JOIN dragonfly.enforcement_cases c ON c.id = %(case_id)s
JOIN dragonfly.judgments j ON j.id = c.judgment_id
LEFT JOIN dragonfly.collectability_scores s ON s.judgment_id = c.judgment_id
"""


def load_case_facts(
    conn: psycopg.Connection[Any], case_id: int, *, as_of: datetime | None = None
) -> CaseFacts:
    """The case's facts as of ``as_of`` (default: the transaction's start); one statement."""
    if not 0 < case_id <= _MAX_BIGINT:
        raise PermanentJobError(f"enforcement case {case_id} not found")
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            _LOAD_FACTS,
            {
                "case_id": case_id,
                "as_of": as_of,
                "window": ATTEMPT_WINDOW_DAYS,
                "attempts": list(ATTEMPT_EVENT_TYPES),
                "activity": list(ACTIVITY_EVENT_TYPES),
            },
        ).fetchone()
    if row is None:
        raise PermanentJobError(f"enforcement case {case_id} not found")
    now: datetime = row["as_of"]
    return CaseFacts(
        case_id=row["id"],
        org_id=row["org_id"],
        judgment_id=row["judgment_id"],
        status=row["status"],
        score=row["score"],
        tier=row["tier"],
        attempts_30d=row["attempts_30d"],
        days_since_activity=max(0, (now - row["last_activity_at"]).days),
        evidence_count=row["evidence_count"],
        judgment_age_years=max(0, age_in_years(row["judgment_date"], now.date())),
    )


@dataclass(frozen=True, kw_only=True)
class NotifyRoute:
    """Where a recommendation's notification goes: an outbox channel, and ``to`` for email."""

    channel: Channel = "webhook"
    to: str | None = None

    def __post_init__(self) -> None:
        if self.channel not in CHANNELS:
            raise PermanentJobError(
                f"notify_channel must be one of {', '.join(CHANNELS)}, got {self.channel!r}"
            )
        if (self.channel == "email") != (self.to is not None):
            raise PermanentJobError(
                "notify_to (one email address) is required with the email channel and refused with the others"
            )
        if self.to is not None and (
            not isinstance(self.to, str) or "@" not in self.to or any(c.isspace() for c in self.to)
        ):
            raise PermanentJobError(f"notify_to must be one email address, got {self.to!r}")


def notify_route(payload: Mapping[str, Any]) -> NotifyRoute:
    """The escalation job payload's ``notify_channel`` (default webhook) and ``notify_to``."""
    return NotifyRoute(channel=payload.get("notify_channel", "webhook"), to=payload.get("notify_to"))


_INSERT_EVENT = """
WITH c AS (
    SELECT id, org_id, judgment_id FROM dragonfly.enforcement_cases WHERE id = %(case_id)s
), ins AS (
    INSERT INTO dragonfly.enforcement_events (case_id, event_type, details, job_key)
    SELECT id, 'recommendation', %(details)s, %(job_key)s FROM c
    ON CONFLICT (job_key) WHERE job_key IS NOT NULL DO NOTHING
    RETURNING id, created_at
)
SELECT c.org_id, c.judgment_id, ins.id, ins.created_at,
       (SELECT e.id FROM dragonfly.enforcement_events e WHERE e.job_key = %(job_key)s)
           AS existing_id
FROM c LEFT JOIN ins ON true
"""


def record_recommendation(
    conn: psycopg.Connection[Any],
    case_id: int,
    rec: Recommendation,
    job_key: str,
    *,
    route: NotifyRoute = NotifyRoute(),
) -> int:
    """Insert the recommendation event and enqueue its notification, in the caller's transaction.

    Returns the event id. A job key already recorded returns that event's id and enqueues
    nothing more: its notification went out with the transaction that inserted it.
    """
    details = {
        "action": rec.action,
        "confidence": rec.confidence,
        "reasons": list(rec.reasons),
        "rule": rec.rule,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            _INSERT_EVENT, {"case_id": case_id, "details": Jsonb(details), "job_key": job_key}
        ).fetchone()
    if row is None:
        raise PermanentJobError(f"enforcement case {case_id} not found")
    if row["id"] is None:
        if row["existing_id"] is None:
            # Another transaction inserted this key after our snapshot: a retry will see it.
            raise RuntimeError(f"recommendation {job_key!r} is being recorded concurrently")
        return int(row["existing_id"])
    event_id = int(row["id"])
    event = {
        "id": event_id,
        "type": "recommendation",
        "case_id": case_id,
        "judgment_id": row["judgment_id"],
        "org_id": row["org_id"],
        "created_at": row["created_at"].isoformat(),
        "job_key": job_key,
        **details,
    }
    payload: dict[str, Any] = {
        "channel": route.channel,
        "subject": _subject(case_id, rec),
        "body": _body(case_id, row["judgment_id"], rec),
        "data": {"event": event},
    }
    if route.to is not None:
        payload["to"] = route.to
    envelope = build_envelope(
        entity_type="notification",
        entity_id=str(event_id),
        org_id=row["org_id"],
        idempotency_key=f"{job_key}:notify",
        payload=payload,
    )
    enqueue(conn, OUTBOX_QUEUE, envelope)
    return event_id


def _subject(case_id: int, rec: Recommendation) -> str:
    return f"Case {case_id}: recommended {rec.action} ({rec.confidence:.0%} confidence)"


def _body(case_id: int, judgment_id: int, rec: Recommendation) -> str:
    lines = [
        f"Enforcement case {case_id} (judgment {judgment_id}): the recommended next"
        f" action is {rec.action}, confidence {rec.confidence:.2f}, by rule {rec.rule}.",
        "",
        "Reasons:",
        *(f"- {reason}" for reason in rec.reasons),
    ]
    return "\n".join(lines)
