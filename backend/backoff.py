"""The one backoff of the runtime: exponential, capped, jittered to half..all of the delay.

Failed jobs (``retry_delay_s``), database retries while booting and during an outage
(``tenacity_wait``) and a loop that fails again right after reconnecting all wait this way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from tenacity import RetryCallState


def backoff_s(attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based): ``base * 2**(attempt-1)``
    capped at ``max_s``, jittered to between half and all of it."""
    raw = min(max_s, base_s * math.ldexp(1.0, min(max(0, attempt - 1), 62)))
    return raw * (0.5 + (rng or random).random() / 2)


def retry_delay_s(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    rng: random.Random | None = None,
    at_least_s: float | None = None,
) -> int:
    """``backoff_s`` rounded up to a whole second (what ``retry_in_s`` in ``JOB_FAILED``
    reports), or ``at_least_s`` (what the other side asked for) when that is longer: never
    less than one second, never more than ``max_s`` rounded up."""
    delay = max(1, math.ceil(backoff_s(attempt, base_s=base_s, max_s=max_s, rng=rng)))
    if at_least_s is not None and at_least_s > delay:
        delay = min(math.ceil(at_least_s), max(1, math.ceil(max_s)))
    return delay


def tenacity_wait(*, base_s: float, max_s: float) -> Callable[[RetryCallState], float]:
    """``backoff_s`` as a tenacity ``wait``."""

    def wait(state: RetryCallState) -> float:
        return backoff_s(state.attempt_number, base_s=base_s, max_s=max_s)

    return wait
