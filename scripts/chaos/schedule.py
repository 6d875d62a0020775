"""The kill schedule, from the seed: kill times, signals (SIGTERM, SIGKILL, and SIGSTOP
freezes longer than the visibility timeout), victims, and the database restart."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

SIGNALS = ("SIGTERM", "SIGKILL")
HANDLER_KILL_SHARE = 0.25
FREEZE_SHARE = 0.2
# Freezes last longer than the visibility timeout, so the frozen worker's work must move.
FREEZE_BEYOND_S = (1.0, 4.0)


@dataclass(frozen=True, kw_only=True)
class Kill:
    """Send ``signal`` at ``at_s`` to the replica in ``slot`` (or the next one that can take it);
    aimed at a handler, to an outbox replica waiting for a slow reply, if one does soon."""

    at_s: float
    signal: str
    slot: int
    aim: str = "any"  # or "handler"
    freeze_s: float = 0.0  # SIGSTOP: how long until SIGCONT


@dataclass(frozen=True, kw_only=True)
class DbRestart:
    """Stop PostgreSQL at ``at_s`` in ``mode``, start it again ``down_s`` later."""

    at_s: float
    mode: str
    down_s: float


@dataclass(frozen=True, kw_only=True)
class Schedule:
    kills: tuple[Kill, ...]
    db_restart: DbRestart | None


def build_schedule(
    *,
    seed: int,
    duration_s: float,
    kill_interval_s: float,
    slots: int,
    db_restart: bool,
    visibility_s: float = 5.0,
) -> Schedule:
    """Kill times, signals and victims, freezes, and the database restart, all from the seed."""
    rng = random.Random(f"{seed}:chaos")
    kills: list[Kill] = []
    at = rng.uniform(0.5, 1.5) * kill_interval_s
    while at < duration_s:
        if rng.random() < FREEZE_SHARE:
            kills.append(
                Kill(
                    at_s=round(at, 3),
                    signal="SIGSTOP",
                    slot=rng.randrange(slots),
                    freeze_s=round(visibility_s + rng.uniform(*FREEZE_BEYOND_S), 2),
                )
            )
        else:
            kills.append(
                Kill(
                    at_s=round(at, 3),
                    signal=rng.choice(SIGNALS),
                    slot=rng.randrange(slots),
                    aim="handler" if rng.random() < HANDLER_KILL_SHARE else "any",
                )
            )
        at += rng.uniform(0.5, 1.5) * kill_interval_s
    if len(kills) >= 3 and not any(k.signal == "SIGSTOP" for k in kills):  # every run freezes one
        kills[1] = replace(
            kills[1],
            signal="SIGSTOP",
            aim="any",
            freeze_s=round(visibility_s + rng.uniform(*FREEZE_BEYOND_S), 2),
        )
    ending = [i for i, k in enumerate(kills) if k.signal in SIGNALS]
    if len(ending) >= 2 and len({kills[i].signal for i in ending}) == 1:
        last = ending[-1]
        other = SIGNALS[1 - SIGNALS.index(kills[last].signal)]
        kills[last] = replace(kills[last], signal=other)  # every run tries both kinds
    restart = (
        DbRestart(
            at_s=round(rng.uniform(0.3, 0.55) * duration_s, 3),
            mode=rng.choice(("fast", "immediate")),
            down_s=round(rng.uniform(2.0, 4.0), 2),
        )
        if db_restart
        else None
    )
    return Schedule(kills=tuple(kills), db_restart=restart)
