"""Collectability scoring of judgments: one rules table, a pure scorer, a set-based store.

The rules (``SCORING_RULES``) are data, stated identically in ``docs/DOMAIN_RULES.md``:
the first ``base`` row whose condition holds picks the rule and tier, then every
``adjust`` row of that rule whose condition holds adds its points; the sum is clamped
to 0-100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any, Literal, cast, get_args

import psycopg
from psycopg.rows import tuple_row

from backend.errors import PermanentJobError, TenantMismatch

Tier = Literal["A", "B", "C"]
Step = Literal["base", "adjust"]
Op = Literal[">=", "<", "in"]
TIERS: tuple[Tier, ...] = get_args(Tier)
_OPS: tuple[Op, ...] = get_args(Op)
_MAX_BIGINT = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class Condition:
    """``fact op value``; a missing (None) fact never satisfies a condition."""

    fact: str
    op: Op
    value: Decimal | tuple[str, ...]

    def __post_init__(self) -> None:
        if (self.op == "in") != isinstance(self.value, tuple):
            raise ValueError(f"operator {self.op!r} does not take {self.value!r}")

    def holds(self, facts: Mapping[str, Any]) -> bool:
        return _all_hold(((self.fact, self.op, self.value),), facts)

    def __str__(self) -> str:
        value = ",".join(self.value) if isinstance(self.value, tuple) else str(self.value)
        return f"{self.fact} {self.op} {value}"


def parse_when(text: str, facts: Sequence[str]) -> tuple[Condition, ...]:
    """Parse ``"fact op value and ..."`` (or ``"always"``), checking fact names against ``facts``."""
    if text.strip() == "always":
        return ()
    conditions = []
    for part in text.split(" and "):
        words = part.split()
        if len(words) != 3 or words[0] not in facts or words[1] not in _OPS:
            raise ValueError(f"bad condition {part!r}: facts are {facts}, operators {_OPS}")
        fact, op, value = words
        try:
            parsed = tuple(value.split(",")) if op == "in" else Decimal(value)
        except ArithmeticError as exc:
            raise ValueError(f"bad condition {part!r}: {value!r} is not a number") from exc
        conditions.append(Condition(fact=fact, op=cast(Op, op), value=parsed))
    return tuple(conditions)


def render_when(conditions: Sequence[Condition]) -> str:
    """The inverse of ``parse_when``: the text the rules table and the docs show."""
    return " and ".join(str(c) for c in conditions) or "always"


SCORING_FACTS = ("amount", "age_years")


@dataclass(frozen=True, kw_only=True)
class ScoringRule:
    """One row of the scoring table."""

    rule: str
    tier: Tier
    step: Step
    when: tuple[Condition, ...]
    points: int


def _row(rule: str, tier: Tier, step: Step, when: str, points: int) -> ScoringRule:
    return ScoringRule(rule=rule, tier=tier, step=step, when=parse_when(when, SCORING_FACTS), points=points)


# age_years is the number of full years since the judgment date (anniversary reached).
SCORING_RULES: tuple[ScoringRule, ...] = (
    _row("A", "A", "base", "amount >= 10000 and age_years < 5", 85),
    _row("A", "A", "adjust", "amount >= 25000", 5),
    _row("A", "A", "adjust", "amount >= 50000", 5),
    _row("A", "A", "adjust", "age_years < 2", 5),
    _row("A", "A", "adjust", "age_years < 1", 5),
    _row("B-large", "B", "base", "amount >= 5000", 65),
    _row("B-large", "B", "adjust", "amount >= 7500", 5),
    _row("B-large", "B", "adjust", "age_years < 3", 5),
    _row("B-large", "B", "adjust", "age_years < 1", 4),
    _row("B-recent", "B", "base", "amount >= 2000 and age_years < 3", 55),
    _row("C", "C", "base", "always", 30),
    _row("C", "C", "adjust", "age_years >= 7", -10),
    _row("C", "C", "adjust", "age_years >= 10", -10),
)


def _check_rules(rules: Sequence[ScoringRule]) -> None:
    bases = {r.rule: r.tier for r in rules if r.step == "base"}
    for r in rules:
        if bases.get(r.rule) != r.tier:
            raise ValueError(f"scoring rule {r.rule!r}: adjust row without a matching base row")
    if not any(r.step == "base" and not r.when for r in rules):
        raise ValueError("the scoring table needs a base row that always applies")


_check_rules(SCORING_RULES)


@dataclass(frozen=True, kw_only=True)
class Score:
    """A judgment's collectability: 0-100, its tier and how it was reached."""

    score: int
    tier: Tier
    reason: str


def age_in_years(start: date, today: date) -> int:
    """Full years from ``start`` to ``today`` (the anniversary day counts as a full year)."""
    return today.year - start.year - ((today.month, today.day) < (start.month, start.day))


_Check = tuple[str, Op, Decimal | tuple[str, ...]]  # a condition's fact, operator and value


def _all_hold(checks: tuple[_Check, ...], facts: Mapping[str, Any]) -> bool:
    """``Condition.holds`` of every check, in one loop (run for each row of each judgment)."""
    for fact, op, value in checks:
        actual = facts[fact]
        if actual is None:
            return False
        if op == ">=":
            if not actual >= value:
                return False
        elif op == "<":
            if not actual < value:
                return False
        elif actual not in cast(tuple[str, ...], value):
            return False
    return True


# A row as scoring reads it: the row, its step as the reason states it, its conditions as checks.
_Arranged = tuple["ScoringRule", str, tuple[_Check, ...]]


@dataclass(frozen=True, kw_only=True)
class _Table:
    """A scoring table arranged for scoring: the base rows in order, and each rule's adjust
    rows in order, each row with its step's text in the reason (``rule B-large (amount >=
    5000) base 65``, ``+5 amount >= 7500``: rendered once, not per judgment) and its
    conditions as plain tuples (``_all_hold``)."""

    bases: tuple[_Arranged, ...]
    adjusts: dict[str, tuple[_Arranged, ...]]

    @classmethod
    def of(cls, rules: Sequence[ScoringRule]) -> _Table:
        def arranged(r: ScoringRule) -> _Arranged:
            when = render_when(r.when)
            step = f"rule {r.rule} ({when}) base {r.points}" if r.step == "base" else f"{r.points:+d} {when}"
            return r, step, tuple((c.fact, c.op, c.value) for c in r.when)

        adjusts: dict[str, list[_Arranged]] = {}
        for r in rules:
            if r.step == "adjust":
                adjusts.setdefault(r.rule, []).append(arranged(r))
        return cls(
            bases=tuple(arranged(r) for r in rules if r.step == "base"),
            adjusts={rule: tuple(rows) for rule, rows in adjusts.items()},
        )


_SCORING_TABLE = _Table.of(SCORING_RULES)


def _first_holding(rows: tuple[_Arranged, ...], facts: Mapping[str, Any]) -> _Arranged:
    for arranged in rows:
        if _all_hold(arranged[2], facts):
            return arranged
    raise ValueError("no base row applies")  # _check_rules: one always does


def score_judgment(
    amount: Decimal, judgment_date: date, today: date, rules: Sequence[ScoringRule] = SCORING_RULES
) -> Score:
    """Score one judgment by the rules table; ValueError on a non-positive amount or future date."""
    if amount <= 0:
        raise ValueError(f"amount must be positive, got {amount}")
    if judgment_date > today:
        raise ValueError(f"judgment date {judgment_date} is after {today}")
    table = _SCORING_TABLE if rules is SCORING_RULES else _Table.of(rules)
    age = age_in_years(judgment_date, today)
    facts = {"amount": amount, "age_years": age}
    base, step, _ = _first_holding(table.bases, facts)
    total = base.points
    steps = [step]
    for row, step, checks in table.adjusts.get(base.rule, ()):
        if _all_hold(checks, facts):
            total += row.points
            steps.append(step)
    score = min(100, max(0, total))
    reason = f"amount ${amount:,.2f}, {age} full years old; {'; '.join(steps)}; score {score}"
    return Score(score=score, tier=base.tier, reason=reason)


# Arrays go in binary: psycopg's text format quotes and escapes every element (the reasons,
# a hundred per batch, took 0.2 ms to dump as text, 0.02 ms in binary).
_SELECT_JUDGMENTS = (
    "SELECT id, org_id, amount, judgment_date FROM dragonfly.judgments WHERE id = ANY(%b::bigint[])"
)
_UPSERT_SCORES = """
INSERT INTO dragonfly.collectability_scores (judgment_id, score, tier, reason, job_key)
SELECT * FROM unnest(%b::bigint[], %b::smallint[], %b::text[], %b::text[], %b::text[])
ON CONFLICT (judgment_id) DO UPDATE
SET score = EXCLUDED.score, tier = EXCLUDED.tier, reason = EXCLUDED.reason,
    job_key = EXCLUDED.job_key, scored_at = EXCLUDED.scored_at
"""


def score_and_store(
    conn: psycopg.Connection[Any],
    judgment_ids: Sequence[int],
    job_keys: Sequence[str],
    today: date,
    org_ids: Sequence[str] | None = None,
) -> list[Score]:
    """Score and upsert the judgments' current scores in two statements; scores in input order.

    Raises ``PermanentJobError`` when a judgment does not exist or cannot be scored, so that
    a batch caller can fall back to scoring its jobs one by one; ``TenantMismatch`` (one of
    them) when ``org_ids`` is given and a judgment belongs to another organisation than its
    job's. A judgment listed twice is stored once, with the last of its job keys.
    """
    if len(judgment_ids) != len(job_keys):
        raise ValueError(f"{len(judgment_ids)} judgment ids but {len(job_keys)} job keys")
    if not judgment_ids:
        return []
    out_of_range = sorted({i for i in judgment_ids if not 0 < i <= _MAX_BIGINT})
    if out_of_range:
        raise PermanentJobError(f"judgment(s) not found: {out_of_range}")
    key_by_id = dict(zip(judgment_ids, job_keys, strict=True))
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(_SELECT_JUDGMENTS, (list(key_by_id),)).fetchall()
        owner = {judgment_id: org_id for judgment_id, org_id, _, _ in rows}
        missing = sorted(key_by_id.keys() - owner.keys())
        if missing:
            raise PermanentJobError(f"judgment(s) not found: {missing}")
        if org_ids is not None:
            _check_tenants(owner, judgment_ids, org_ids)
        scores: dict[int, Score] = {}
        for judgment_id, _, amount, judgment_date in rows:
            try:
                scores[judgment_id] = score_judgment(amount, judgment_date, today)
            except ValueError as exc:
                raise PermanentJobError(f"judgment {judgment_id} cannot be scored: {exc}") from exc
        ids = list(key_by_id)
        cur.execute(
            _UPSERT_SCORES,
            (
                ids,
                [scores[i].score for i in ids],
                [scores[i].tier for i in ids],
                [scores[i].reason for i in ids],
                [key_by_id[i] for i in ids],
            ),
        )
    return [scores[i] for i in judgment_ids]


def _check_tenants(owner: Mapping[int, str], judgment_ids: Sequence[int], org_ids: Sequence[str]) -> None:
    """Every judgment must belong to the organisation its job names (``owner``: id -> org)."""
    foreign = sorted({i for i, org in zip(judgment_ids, org_ids, strict=True) if owner[i] != org})
    if foreign:
        raise TenantMismatch(f"judgment(s) {foreign} belong to another organisation than the job's org_id")
