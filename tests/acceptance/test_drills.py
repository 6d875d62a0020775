"""The troubleshooting drills of scripts/drills.py, each staged for real on the test
database: the event line the operator sees, and the inspector's verdict and exit code
within 60 s."""

from __future__ import annotations

import pytest

from scripts import drills, drills_railway

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


@pytest.mark.parametrize("name", list(drills_railway.RAILWAY_DRILLS))
def test_under_restarts_the_inspector_names_the_failure_and_keeps_naming_it(name: str, clean_db: str) -> None:
    """``python -m scripts.drills --defaults`` at the suite's pace: the same restarter (a new
    instance after each exit), a 1 s heartbeat; the verdict names the failure soon after it
    and keeps naming it while the restarts go on."""
    result = drills_railway.run_drill(clean_db, name, drills_railway.SHORT)
    assert result.passed, drills_railway.table([result])
    assert result.after_s is not None and result.after_s <= drills_railway.SHORT.within_s
    assert result.held_s >= drills_railway.SHORT.hold_s
