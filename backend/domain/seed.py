"""Deterministic demo data: plaintiffs, debtors, judgments, cases, events and evidence.

The same ``seed`` and ``today`` give the same data (ids depend on what the tables held).
Every table is filled by one set-based INSERT, inside one transaction.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

EVENT_TYPES = ("garnishment", "levy", "skiptrace_refresh", "attorney_review", "payment", "note")
EVENT_WEIGHTS = (30, 15, 20, 10, 15, 10)
EVIDENCE_KINDS = ("bank_account", "employer", "property", "vehicle", "address", "document")
CASE_STATUSES = ("open", "paused", "closed")
CASE_STATUS_WEIGHTS = (80, 10, 10)
JUDGMENTS_PER_PLAINTIFF = 25
MAX_JUDGMENT_AGE_DAYS = 15 * 365
_PLAINTIFFS = (
    "Hudson Valley Funding",
    "Empire Recovery Partners",
    "Atlas Credit Union",
    "Brooklyn Supply Co",
    "Catskill Medical Group",
    "Harbor Lending",
)
_FIRST = ("Alex", "Jordan", "Sam", "Taylor", "Morgan", "Casey", "Riley", "Jamie", "Avery", "Quinn")
_LAST = ("Rivera", "Chen", "Okafor", "Smith", "Kowalski", "Haddad", "Nguyen", "Brown", "Levy")
_STATES = ("NY", "NJ", "CT", "PA", "MA")


@dataclass(frozen=True, kw_only=True)
class _Case:
    judgment_index: int
    status: str
    opened_at: datetime
    last_activity_at: datetime
    events: list[tuple[str, datetime]]
    evidence: list[tuple[str, datetime]]


def seed_demo(
    conn: psycopg.Connection[Any],
    *,
    judgments: int,
    cases: int,
    org_id: str = "org-demo",
    seed: int = 1,
    today: date | None = None,
) -> dict[str, Any]:
    """Insert a spread of demo data for ``org_id``; returns the org and the new ids per table."""
    if judgments < 0 or not 0 <= cases <= judgments:
        raise ValueError(f"need 0 <= cases <= judgments, got {cases} cases, {judgments} judgments")
    rng = random.Random(seed)
    today = today or datetime.now(UTC).date()
    now = datetime.combine(today, time(12), tzinfo=UTC)
    n_plaintiffs = math.ceil(judgments / JUDGMENTS_PER_PLAINTIFF)
    n_debtors = math.ceil(judgments * 0.9)  # some debtors owe several judgments
    amounts = [_amount(rng) for _ in range(judgments)]
    dates = [today - timedelta(days=rng.randrange(MAX_JUDGMENT_AGE_DAYS)) for _ in range(judgments)]
    demo_cases = [_case(rng, i, dates[i], now) for i in sorted(rng.sample(range(judgments), cases))]

    with conn.transaction(), conn.cursor() as cur:
        plaintiff_ids = _ids(
            cur.execute(
                "INSERT INTO dragonfly.plaintiffs (org_id, name)"
                " SELECT %s, name FROM unnest(%s::text[]) WITH ORDINALITY AS u(name, n)"
                " ORDER BY n RETURNING id",
                (org_id, [_plaintiff_name(i) for i in range(n_plaintiffs)]),
            ).fetchall()
        )
        debtor_ids = _ids(
            cur.execute(
                "INSERT INTO dragonfly.debtors (org_id, name, state)"
                " SELECT %s, name, state FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY"
                " AS u(name, state, n) ORDER BY n RETURNING id",
                (
                    org_id,
                    [f"{rng.choice(_FIRST)} {rng.choice(_LAST)}" for _ in range(n_debtors)],
                    [rng.choice(_STATES) for _ in range(n_debtors)],
                ),
            ).fetchall()
        )
        judgment_ids = _ids(
            cur.execute(
                "INSERT INTO dragonfly.judgments"
                " (org_id, plaintiff_id, debtor_id, amount, judgment_date, case_number)"
                " SELECT %s, p, d, a, jd, cn FROM unnest(%s::bigint[], %s::bigint[], %s::numeric[],"
                " %s::date[], %s::text[]) WITH ORDINALITY AS u(p, d, a, jd, cn, n)"
                " ORDER BY n RETURNING id",
                (
                    org_id,
                    [rng.choice(plaintiff_ids) for _ in range(judgments)],
                    [rng.choice(debtor_ids) for _ in range(judgments)],
                    amounts,
                    dates,
                    [f"{d.year}-CV-{seed}-{i:06d}" for i, d in enumerate(dates)],
                ),
            ).fetchall()
        )
        case_ids = _ids(
            cur.execute(
                "INSERT INTO dragonfly.enforcement_cases"
                " (org_id, judgment_id, status, opened_at, last_activity_at, closed_at)"
                " SELECT %s, j, s, o, la, CASE WHEN s = 'closed' THEN la END"
                " FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[], %s::timestamptz[])"
                " WITH ORDINALITY AS u(j, s, o, la, n) ORDER BY n RETURNING id",
                (
                    org_id,
                    [judgment_ids[c.judgment_index] for c in demo_cases],
                    [c.status for c in demo_cases],
                    [c.opened_at for c in demo_cases],
                    [c.last_activity_at for c in demo_cases],
                ),
            ).fetchall()
        )
        events = [
            (case_id, kind, at)
            for case_id, c in zip(case_ids, demo_cases, strict=True)
            for kind, at in c.events
        ]
        cur.execute(
            "INSERT INTO dragonfly.enforcement_events (case_id, event_type, details, created_at)"
            " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::jsonb[], %s::timestamptz[])",
            (
                [e[0] for e in events],
                [e[1] for e in events],
                [Jsonb({"source": "seed"}) for _ in events],
                [e[2] for e in events],
            ),
        )
        evidence = [
            (case_id, kind, at)
            for case_id, c in zip(case_ids, demo_cases, strict=True)
            for kind, at in c.evidence
        ]
        cur.execute(
            "INSERT INTO dragonfly.evidence (case_id, kind, created_at)"
            " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[])",
            ([e[0] for e in evidence], [e[1] for e in evidence], [e[2] for e in evidence]),
        )
    return {
        "org_id": org_id,
        "plaintiff_ids": plaintiff_ids,
        "debtor_ids": debtor_ids,
        "judgment_ids": judgment_ids,
        "case_ids": case_ids,
        "event_count": len(events),
        "evidence_count": len(evidence),
    }


def _ids(rows: list[Any]) -> list[int]:
    # Identity values follow the ORDER BY of the insert, so sorted ids are in input order.
    return sorted(int(row["id"] if isinstance(row, dict) else row[0]) for row in rows)


def _plaintiff_name(i: int) -> str:
    name = _PLAINTIFFS[i % len(_PLAINTIFFS)]
    return name if i < len(_PLAINTIFFS) else f"{name} {i // len(_PLAINTIFFS) + 1}"


def _amount(rng: random.Random) -> Decimal:
    """Log-uniform from $500 to $150,000, so every tier gets judgments."""
    return Decimal(round(500 * 300 ** rng.random(), 2)).quantize(Decimal("0.01"))


def _case(rng: random.Random, judgment_index: int, judgment_date: date, now: datetime) -> _Case:
    earliest = max(datetime.combine(judgment_date, time(12), tzinfo=UTC), now - timedelta(days=900))
    opened_at = earliest + (now - earliest) * rng.random()
    idle = (now - opened_at) * min(1.0, rng.expovariate(4.0))
    last_activity_at = now - idle
    events = sorted(
        (
            (
                rng.choices(EVENT_TYPES, EVENT_WEIGHTS)[0],
                opened_at + (last_activity_at - opened_at) * rng.random(),
            )
            for _ in range(rng.choice((0, 1, 1, 2, 3, 4, 5)))
        ),
        key=lambda e: e[1],
    )
    if events:
        events[-1] = (events[-1][0], last_activity_at)
    else:
        last_activity_at = opened_at
    evidence = [
        (rng.choice(EVIDENCE_KINDS), opened_at + (now - opened_at) * rng.random())
        for _ in range(rng.choice((0, 1, 1, 2, 3, 4)))
    ]
    return _Case(
        judgment_index=judgment_index,
        status=rng.choices(CASE_STATUSES, CASE_STATUS_WEIGHTS)[0],
        opened_at=opened_at,
        last_activity_at=last_activity_at,
        events=events,
        evidence=evidence,
    )
