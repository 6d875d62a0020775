"""The troubleshooting drills of scripts/drills.py, each staged for real on the test
database: the event line the operator sees, and the inspector's verdict and exit code
within 60 s."""

from __future__ import annotations

import pytest

from scripts import drills

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.mark.parametrize("name", list(drills.DRILLS))
def test_the_drill_shows_the_operator_what_happened(name: str, clean_db: str) -> None:
    drill = drills.Drill(clean_db)
    try:
        seen = drills.DRILLS[name](drill)
    finally:
        drill.close()
    assert seen.event
    assert seen.inspector_exit in (0, 1, 2)
    assert seen.verdict_after_s is None or seen.verdict_after_s <= drills.VERDICT_WITHIN_S
