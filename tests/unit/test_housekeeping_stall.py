"""The housekeeping thread says when the process did not run (a freeze, a stalled container)."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from backend.workers.held import HeldJobs
from backend.workers.housekeeping import Housekeeper, HousekeepingPlan

PLAN = HousekeepingPlan(
    queue="q_test",
    worker_id="w-1",
    heartbeat_interval_s=3600.0,
    lease_s=3600,
    memory_limit_bytes=None,
    memory_soft_pct=90.0,
    memory_check_interval_s=0.05,
    progress_interval_s=60.0,
    prune_interval_s=3600.0,
    ledger_retention_days=7.0,
    heartbeat_retention_days=7.0,
)


class FrozenOnce:
    """The monotonic clock, jumping ``jump_s`` ahead once after 0.3 s: what a process that
    was stopped and continued sees."""

    def __init__(self, jump_s: float) -> None:
        self.start, self.jump_s = time.monotonic(), jump_s

    def __call__(self) -> float:
        now = time.monotonic()
        return now + (self.jump_s if now - self.start > 0.3 else 0.0)


def stalls(jump_s: float, caplog: pytest.LogCaptureFixture) -> list[Any]:
    keeper = Housekeeper(
        PLAN,
        pool=None,
        beat=lambda: None,
        held=HeldJobs(),  # type: ignore[arg-type]
        on_memory_exceeded=lambda _v: None,
        clock=FrozenOnce(jump_s),
    )
    with caplog.at_level(logging.INFO, logger="dragonfly.events"):
        keeper.start()
        time.sleep(0.8)  # 16 ticks of 0.05 s; the first retention pass (5 s) is out of reach
        keeper.stop()
    return [r.data for r in caplog.records if getattr(r, "event", "") == "WORKER_STALLED"]


def test_a_wait_that_ends_seconds_late_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    [event] = stalls(3.0, caplog)
    assert event["worker_id"] == "w-1" and 2.9 <= event["stalled_s"] <= 3.2


def test_ordinary_ticks_report_nothing(caplog: pytest.LogCaptureFixture) -> None:
    assert stalls(0.0, caplog) == []
