"""What a bench run uses and measures: its names (modules, queues, the counting role), the
volumes of a run (``Plan``) and the raw samples it collects (``Collected``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scripts.harness.process import ROOT

PGDATA = ROOT / ".data" / "bench-pg"
RESULTS = ROOT / "bench-results"
BENCH_MODULE = "scripts.bench_worker"
COLLECTABILITY_MODULE = "backend.workers.collectability"
BENCH_QUEUE = "q_bench"
BASE_QUEUE = "q_bench_base"
SCORE_QUEUE = "q_collectability"
COUNTED_ROLE = "bench_counted"
ORG = "org-bench"
PICKUP_EVENT = "BENCH_PICKUP"  # logged by scripts/bench_worker.py
DEFAULT_BATCH = 100
VT_S = 30
# The worker's first retention pass runs 5 s after boot; idle counting starts after it.
FIRST_PRUNE_S = 5.0
MB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Volumes and repetitions of one bench run."""

    repeat: int = 5
    jobs: int = 40_000
    small_batch_jobs: int = 15_000  # batch 10 is slow; fewer jobs keep the run short
    batch_sizes: tuple[int, ...] = (10, 50, 100, 250)
    judgments: int = 20_000
    probes: int = 200
    probe_gap_s: tuple[float, float] = (0.02, 0.05)
    idle_window_s: float = 8.0  # with notifications: about one read per second
    poll_idle_window_s: float = 3.0  # polling reads ten times a second
    soak_jobs: int = 200_000
    soak_round: int = 50_000
    enqueue_batch: int = 1_000
    quick: bool = False

    def jobs_for(self, batch: int) -> int:
        return self.small_batch_jobs if batch < 50 else self.jobs

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            repeat=1,
            jobs=10_000,
            small_batch_jobs=5_000,
            judgments=5_000,
            probes=60,
            idle_window_s=4.0,
            poll_idle_window_s=2.0,
            soak_jobs=50_000,
            soak_round=25_000,
            quick=True,
        )


@dataclass
class Collected:
    """Raw samples of every figure, by key, and the details of every run."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    # The baseline loop's rate at the default batch size, per repetition (the mean of the
    # runs around the worker's): what that repetition's ratios divide by.
    around: dict[int, float | None] = field(default_factory=dict)

    def add(self, key: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(key, []).append(value)


def progress(text: str) -> None:
    """One indented progress line, at once."""
    print(f"  {text}", flush=True)
