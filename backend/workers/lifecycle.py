"""The worker's lifecycle: one ``transitions`` machine, the single source of truth of state.

Every transition emits its structured event (with ``from``, ``to`` and ``trigger``) and
writes the new state to the heartbeat row. Triggers that do not apply in the current
state return False instead of raising: a second SIGTERM while DRAINING is a decision
for the caller (abandon), not an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from transitions import EventData
from transitions.extensions import LockedMachine

from backend.events import Event


class State(StrEnum):
    """Lifecycle states; their names are what the heartbeat row's ``status`` says."""

    BOOTING = "BOOTING"
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"
    CRASHED = "CRASHED"


# The transition table, as data: (trigger, sources, destination).
TRANSITIONS: tuple[tuple[str, tuple[State, ...], State], ...] = (
    ("booted", (State.BOOTING,), State.RUNNING),
    ("boot_failed", (State.BOOTING,), State.CRASHED),
    ("drain", (State.BOOTING, State.RUNNING), State.DRAINING),
    ("finish", (State.DRAINING,), State.STOPPED),
    ("abandon", (State.DRAINING,), State.STOPPED),
    ("crash", (State.BOOTING, State.RUNNING, State.DRAINING), State.CRASHED),
)

# The event each destination emits.
EVENTS: Mapping[State, Event] = {
    State.RUNNING: Event.WORKER_BOOT,
    State.DRAINING: Event.WORKER_DRAINING,
    State.STOPPED: Event.WORKER_SHUTDOWN,
    State.CRASHED: Event.WORKER_CRASH,
}
_LEVELS: Mapping[State, int] = {State.CRASHED: logging.ERROR}

Emit = Callable[[Event, Mapping[str, Any], int], None]
WriteStatus = Callable[[State], None]


class Lifecycle:
    """The machine's model. Trigger methods return True when the transition happened."""

    state: State

    def __init__(self, *, emit: Emit, write_status: WriteStatus) -> None:
        self._emit = emit
        self._write_status = write_status
        self.machine = LockedMachine(
            model=self,
            states=State,
            initial=State.BOOTING,
            transitions=[{"trigger": t, "source": list(s), "dest": d} for t, s, d in TRANSITIONS],
            send_event=True,
            auto_transitions=False,
            ignore_invalid_triggers=True,
            after_state_change="_after_transition",
            model_override=True,
        )

    # Declared so that type checkers see them; the machine binds the real triggers.
    def booted(self, **data: Any) -> bool:
        raise NotImplementedError

    def boot_failed(self, **data: Any) -> bool:
        raise NotImplementedError

    def drain(self, **data: Any) -> bool:
        raise NotImplementedError

    def finish(self, **data: Any) -> bool:
        raise NotImplementedError

    def abandon(self, **data: Any) -> bool:
        raise NotImplementedError

    def crash(self, **data: Any) -> bool:
        raise NotImplementedError

    def _after_transition(self, event: EventData) -> None:
        source = State(event.transition.source if event.transition else self.state)
        dest = self.state
        trigger = event.event.name if event.event else ""
        data: dict[str, Any] = {"from": source.value, "to": dest.value, "trigger": trigger, **event.kwargs}
        # The event first: the status write may wait on the database.
        if trigger == "boot_failed":
            self._emit(
                Event.WORKER_BOOT, {**data, "db_status": data.get("db_status", "error")}, logging.ERROR
            )
        self._emit(EVENTS[dest], data, _LEVELS.get(dest, logging.INFO))
        self._write_status(dest)
