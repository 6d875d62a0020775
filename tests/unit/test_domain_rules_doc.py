"""docs/DOMAIN_RULES.md states the code's rules tables row for row."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from backend.domain.collectability import SCORING_RULES, render_when, score_judgment
from backend.domain.escalation import ESCALATION_RULES

DOC = Path(__file__).resolve().parents[2] / "docs" / "DOMAIN_RULES.md"


def table_after(heading: str, header: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The body rows of the first table with ``header`` under ``heading``."""
    lines = DOC.read_text().splitlines()
    start = lines.index(heading)
    rows: list[tuple[str, ...]] = []
    in_table = False
    for line in lines[start + 1 :]:
        if line.startswith("## ") and not in_table:
            break
        if not line.startswith("|"):
            if in_table:
                break
            continue
        cells = tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
        if not in_table:
            in_table = cells == header
        elif not all(set(cell) <= {"-", ":"} for cell in cells):
            rows.append(cells)
    assert rows, f"no table {header} under {heading!r} in {DOC.name}"
    return rows


def test_scoring_table_matches_the_code() -> None:
    doc = table_after("## Collectability rules", ("rule", "tier", "step", "when", "points"))
    code = [
        (r.rule, r.tier, r.step, render_when(r.when), str(r.points) if r.step == "base" else f"{r.points:+d}")
        for r in SCORING_RULES
    ]
    assert doc == code


def test_escalation_table_matches_the_code() -> None:
    doc = table_after("## Escalation rules", ("rule", "action", "confidence", "when", "why"))
    code = [(r.rule, r.action, f"{r.confidence:.2f}", render_when(r.when), r.why) for r in ESCALATION_RULES]
    assert doc == code


EXAMPLES = table_after("## Collectability rules", ("amount", "judgment date", "score", "tier"))


@pytest.mark.parametrize(("amount", "judgment_date", "score", "tier"), EXAMPLES)
def test_documented_examples_score_as_stated(amount: str, judgment_date: str, score: str, tier: str) -> None:
    result = score_judgment(Decimal(amount), date.fromisoformat(judgment_date), date(2025, 6, 1))
    assert (result.score, result.tier) == (int(score), tier)
