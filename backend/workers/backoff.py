"""Exponential backoff with jitter between attempts of a failed job."""

from __future__ import annotations

import math
import random


def retry_delay_s(attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> int:
    """Whole seconds to wait after failed attempt ``attempt`` (1-based).

    The delay is ``base * 2**(attempt-1)`` capped at ``max_s``, jittered to between half and
    all of it, and rounded up to a whole second (what ``retry_in_s`` in ``JOB_FAILED``
    reports). Never less than one second, never more than ``max_s`` rounded up.
    """
    r: random.Random = rng or random.Random()
    raw = min(max_s, base_s * math.ldexp(1.0, max(0, attempt - 1)))
    jittered = raw * (0.5 + r.random() / 2)
    return max(1, math.ceil(jittered))
