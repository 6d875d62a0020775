"""Resident memory of this process, and the soft-limit check."""

from __future__ import annotations

import os
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size, from /proc (no dependency, ~10 µs)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True, kw_only=True)
class MemoryVerdict:
    """One RSS sample against the soft limit."""

    rss_bytes: int
    limit_bytes: int | None
    soft_limit_bytes: int | None

    @property
    def over(self) -> bool:
        return self.soft_limit_bytes is not None and self.rss_bytes > self.soft_limit_bytes

    def figures(self) -> dict[str, float | None]:
        mb = 1024 * 1024
        return {
            "rss_mb": round(self.rss_bytes / mb, 1),
            "limit_mb": round(self.limit_bytes / mb, 1) if self.limit_bytes else None,
            "soft_limit_mb": round(self.soft_limit_bytes / mb, 1) if self.soft_limit_bytes else None,
        }


def check_memory(limit_bytes: int | None, soft_pct: float) -> MemoryVerdict:
    soft = int(limit_bytes * soft_pct / 100) if limit_bytes else None
    return MemoryVerdict(rss_bytes=rss_bytes(), limit_bytes=limit_bytes, soft_limit_bytes=soft)
