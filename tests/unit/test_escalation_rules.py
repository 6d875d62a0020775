"""The escalation rules, boundary by boundary: which rule fires, for which facts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from backend.domain.escalation import (
    ACTIONS,
    ESCALATION_RULES,
    CaseFacts,
    EscalationRule,
    NotifyRoute,
    notify_route,
    recommend,
)
from backend.errors import PermanentJobError

# An open, tier B case with one lead and recent activity: the "garnish" rule.
BASE = CaseFacts(
    case_id=1,
    org_id="org-1",
    judgment_id=2,
    status="open",
    score=70,
    tier="B",
    attempts_30d=0,
    days_since_activity=10,
    evidence_count=1,
    judgment_age_years=2,
)
STRONG = {"score": 90, "tier": "A", "evidence_count": 2}


@pytest.mark.parametrize(
    ("changes", "rule", "action"),
    [
        ({}, "garnish", "garnishment"),
        ({"status": "closed"}, "inactive_case", "attorney_review"),
        ({"status": "paused"}, "inactive_case", "attorney_review"),
        ({"status": "closed", "judgment_age_years": 12}, "inactive_case", "attorney_review"),
        ({"judgment_age_years": 9}, "garnish", "garnishment"),
        ({"judgment_age_years": 10}, "old_judgment", "attorney_review"),
        ({"attempts_30d": 2}, "garnish", "garnishment"),
        ({"attempts_30d": 3}, "repeated_attempts", "attorney_review"),
        ({"attempts_30d": 3, "evidence_count": 0}, "repeated_attempts", "attorney_review"),
        ({"evidence_count": 0}, "no_evidence", "skiptrace_refresh"),
        ({"evidence_count": 0, **STRONG}, "strong_levy", "levy"),
        ({"days_since_activity": 89}, "garnish", "garnishment"),
        ({"days_since_activity": 90}, "stale_leads", "skiptrace_refresh"),
        ({"days_since_activity": 90, "evidence_count": 2}, "stale_leads", "skiptrace_refresh"),
        ({"days_since_activity": 90, "evidence_count": 3}, "garnish", "garnishment"),
        (STRONG, "strong_levy", "levy"),
        ({**STRONG, "score": 85}, "strong_levy", "levy"),
        ({**STRONG, "score": 84}, "garnish", "garnishment"),
        ({**STRONG, "evidence_count": 1}, "garnish", "garnishment"),
        ({**STRONG, "attempts_30d": 1}, "strong_levy", "levy"),
        ({**STRONG, "attempts_30d": 2}, "garnish", "garnishment"),
        ({"score": 30, "tier": "C"}, "fallback", "attorney_review"),
        ({"score": 30, "tier": "C", "evidence_count": 2}, "fallback", "attorney_review"),
        ({"score": 30, "tier": "C", "evidence_count": 3}, "garnish_low_tier", "garnishment"),
        ({"score": None, "tier": None}, "fallback", "attorney_review"),
        ({"score": None, "tier": None, "evidence_count": 0}, "no_evidence", "skiptrace_refresh"),
    ],
)
def test_first_matching_rule_decides(changes: dict[str, Any], rule: str, action: str) -> None:
    rec = recommend(replace(BASE, **changes))
    assert (rec.rule, rec.action) == (rule, action)
    table = {r.rule: r for r in ESCALATION_RULES}
    assert rec.confidence == table[rule].confidence


def test_reasons_give_the_why_and_each_condition_with_its_value() -> None:
    rec = recommend(replace(BASE, days_since_activity=120, evidence_count=2))
    assert rec.reasons == (
        "few leads and no recent activity: refresh the debtor's whereabouts",
        "days_since_activity is 120 (days_since_activity >= 90)",
        "evidence_count is 2 (evidence_count < 3)",
    )


def test_an_unscored_judgment_says_so() -> None:
    rec = recommend(replace(BASE, score=None, tier=None))
    assert rec.reasons[-1] == "the judgment has no collectability score yet"


def test_the_table_is_total_and_well_formed() -> None:
    assert not ESCALATION_RULES[-1].when
    assert len({r.rule for r in ESCALATION_RULES}) == len(ESCALATION_RULES)
    for r in ESCALATION_RULES:
        assert r.action in ACTIONS
        assert 0 < r.confidence <= 1


def test_every_action_is_reachable() -> None:
    reached = {
        recommend(replace(BASE, **c)).action
        for c in ({}, {"status": "closed"}, {"evidence_count": 0}, STRONG)
    }
    assert reached == set(ACTIONS)


def test_a_custom_table_is_used() -> None:
    always_levy = (EscalationRule(rule="x", action="levy", confidence=0.5, when=(), why="test"),)
    assert recommend(BASE, always_levy).action == "levy"


@pytest.mark.parametrize(
    ("payload", "route"),
    [
        ({}, NotifyRoute(channel="webhook")),
        ({"notify_channel": "webhook"}, NotifyRoute(channel="webhook")),
        ({"notify_channel": "slack"}, NotifyRoute(channel="slack")),
        ({"notify_channel": "discord"}, NotifyRoute(channel="discord")),
        (
            {"notify_channel": "email", "notify_to": "ops@example.com"},
            NotifyRoute(channel="email", to="ops@example.com"),
        ),
    ],
)
def test_notify_route_defaults_to_webhook(payload: dict[str, Any], route: NotifyRoute) -> None:
    assert notify_route(payload) == route


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"notify_channel": "pager"}, "notify_channel"),
        ({"notify_channel": ""}, "notify_channel"),
        ({"notify_channel": None}, "notify_channel"),
        ({"notify_channel": ["email"]}, "notify_channel"),
        ({"notify_channel": "email"}, "notify_to"),
        ({"notify_to": "ops@example.com"}, "notify_to"),
        ({"notify_channel": "email", "notify_to": "not an address"}, "notify_to"),
        ({"notify_channel": "email", "notify_to": 7}, "notify_to"),
    ],
)
def test_unusable_notify_options_are_permanent(payload: dict[str, Any], error: str) -> None:
    with pytest.raises(PermanentJobError, match=error):
        notify_route(payload)
