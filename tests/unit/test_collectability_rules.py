"""The collectability rules, boundary by boundary."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest

from backend.domain.collectability import (
    SCORING_RULES,
    ScoringRule,
    age_in_years,
    parse_when,
    render_when,
    score_judgment,
)

TODAY = date(2025, 6, 1)


def years_ago(years: int, days: int = 0) -> date:
    """The date ``years`` anniversaries before TODAY, moved ``days`` later (younger)."""
    return date(TODAY.year - years, TODAY.month, TODAY.day) + timedelta(days=days)


@pytest.mark.parametrize(
    ("amount", "judgment_date", "score", "tier"),
    [
        # Tier A: $10,000 and under 5 full years.
        ("10000.00", years_ago(4, 1), 85, "A"),
        ("10000.00", years_ago(5, 1), 85, "A"),  # the day before the 5th anniversary
        ("10000.00", years_ago(5), 70, "B"),  # 5 years exactly: no longer A
        ("9999.99", years_ago(4), 70, "B"),  # a cent under $10,000
        ("9999.99", years_ago(2), 75, "B"),
        ("25000.00", years_ago(4), 90, "A"),
        ("24999.99", years_ago(4), 85, "A"),
        ("50000.00", years_ago(4), 95, "A"),
        ("10000.00", years_ago(2, 1), 90, "A"),  # the day before the 2nd anniversary
        ("10000.00", years_ago(2), 85, "A"),  # 2 years exactly
        ("10000.00", years_ago(0, -1), 95, "A"),  # under 1 year
        ("10000.00", years_ago(1), 90, "A"),  # 1 year exactly
        ("50000.00", TODAY, 100, "A"),  # 105 capped at 100
        ("999999999999.99", TODAY, 100, "A"),
        # Tier B, large: $5,000 whatever the age, 65-79.
        ("5000.00", years_ago(20), 65, "B"),
        ("4999.99", years_ago(4), 30, "C"),
        ("7500.00", years_ago(4), 70, "B"),
        ("7499.99", years_ago(4), 65, "B"),
        ("5000.00", years_ago(3, 1), 70, "B"),  # under 3 years
        ("5000.00", years_ago(3), 65, "B"),  # 3 years exactly
        ("7500.00", TODAY, 79, "B"),  # every bonus: the maximum of B
        ("100000.00", years_ago(6), 70, "B"),  # large but too old for A
        # Tier B, recent: $2,000 and under 3 years, flat 55.
        ("2000.00", years_ago(3, 1), 55, "B"),
        ("2000.00", years_ago(3), 30, "C"),  # 3 years exactly
        ("1999.99", years_ago(1), 30, "C"),
        ("4999.99", TODAY, 55, "B"),
        # Tier C: 30, 20 from 7 years, 10 from 10 years.
        ("0.01", TODAY, 30, "C"),
        ("1999.99", years_ago(7, 1), 30, "C"),
        ("1999.99", years_ago(7), 20, "C"),
        ("1999.99", years_ago(10, 1), 20, "C"),
        ("1999.99", years_ago(10), 10, "C"),
        ("4999.99", years_ago(40), 10, "C"),
        ("2000.00", years_ago(10), 10, "C"),
    ],
)
def test_score_and_tier(amount: str, judgment_date: date, score: int, tier: str) -> None:
    result = score_judgment(Decimal(amount), judgment_date, TODAY)
    assert (result.score, result.tier) == (score, tier)


def test_reason_names_the_facts_and_every_row_that_counted() -> None:
    result = score_judgment(Decimal("9999.99"), date(2024, 6, 1), TODAY)
    assert result.reason == (
        "amount $9,999.99, 1 full years old; rule B-large (amount >= 5000)"
        " base 65; +5 amount >= 7500; +5 age_years < 3; score 75"
    )


@pytest.mark.parametrize(
    ("start", "today", "years"),
    [
        (date(2020, 6, 1), date(2025, 5, 31), 4),
        (date(2020, 6, 1), date(2025, 6, 1), 5),
        (date(2020, 2, 29), date(2025, 2, 28), 4),  # leap day: a year older on 1 March
        (date(2020, 2, 29), date(2025, 3, 1), 5),
        (date(2020, 2, 29), date(2024, 2, 29), 4),
        (date(2025, 6, 1), date(2025, 6, 1), 0),
        (date(2024, 12, 31), date(2025, 1, 1), 0),
    ],
)
def test_age_counts_full_years(start: date, today: date, years: int) -> None:
    assert age_in_years(start, today) == years


@pytest.mark.parametrize(
    ("amount", "judgment_date"),
    [
        ("0", TODAY),
        ("-1.00", TODAY),
        ("100.00", date(2025, 6, 2)),
    ],
)
def test_unscorable_judgments_are_rejected(amount: str, judgment_date: date) -> None:
    with pytest.raises(ValueError):
        score_judgment(Decimal(amount), judgment_date, TODAY)


def test_every_score_stays_within_its_tier_band() -> None:
    bands = {"A": range(85, 101), "B": range(55, 80), "C": range(10, 31)}
    for cents in (
        1,
        199_999,
        200_000,
        499_999,
        500_000,
        750_000,
        999_999,
        1_000_000,
        2_500_000,
        5_000_000,
        10**12,
    ):
        for days in range(0, 16 * 366, 61):
            result = score_judgment(Decimal(cents) / 100, TODAY - timedelta(days=days), TODAY)
            assert result.score in bands[result.tier], (cents, days, result)


@pytest.mark.parametrize(
    "text",
    [
        "always",
        "amount >= 10000",
        "amount >= 10000 and age_years < 5",
        "amount >= 0.01",
    ],
)
def test_conditions_render_as_parsed(text: str) -> None:
    assert render_when(parse_when(text, ("amount", "age_years"))) == text


@pytest.mark.parametrize("text", ["debt >= 1", "amount > 1", "amount >=", "amount >= x"])
def test_bad_conditions_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_when(text, ("amount", "age_years"))


def test_a_custom_table_is_applied_first_match() -> None:
    rules = (
        ScoringRule(
            rule="big",
            tier="A",
            step="base",
            when=parse_when("amount >= 100", ("amount", "age_years")),
            points=99,
        ),
        *SCORING_RULES,
    )
    assert score_judgment(Decimal("100"), TODAY, TODAY).score == 30
    assert score_judgment(Decimal("100"), TODAY, TODAY, rules).score == 99
