from __future__ import annotations

import logging
from typing import Any

import pytest

from backend.workers.lifecycle import EVENTS, TRANSITIONS, Lifecycle, State


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], int]] = []
        self.statuses: list[State] = []

    def emit(self, event: str, data: Any, level: int) -> None:
        self.events.append((event, dict(data), level))

    def write_status(self, state: State) -> None:
        self.statuses.append(state)


def machine_in(state: State) -> tuple[Lifecycle, Recorder]:
    rec = Recorder()
    life = Lifecycle(emit=rec.emit, write_status=rec.write_status)
    path = {
        State.BOOTING: [],
        State.RUNNING: ["booted"],
        State.DRAINING: ["drain"],
        State.STOPPED: ["drain", "finish"],
        State.CRASHED: ["crash"],
    }[state]
    for trigger in path:
        assert getattr(life, trigger)() is True
    rec.events.clear()
    rec.statuses.clear()
    return life, rec


ALLOWED = [(t, src, dst) for t, sources, dst in TRANSITIONS for src in sources]


@pytest.mark.parametrize(("trigger", "source", "dest"), ALLOWED)
def test_allowed_transition_emits_its_event_and_writes_status(
    trigger: str, source: State, dest: State
) -> None:
    life, rec = machine_in(source)
    assert getattr(life, trigger)(reason="test") is True
    assert life.state is dest
    assert rec.statuses == [dest]
    event, data, level = rec.events[-1]
    assert event == EVENTS[dest]
    assert data["from"] == source.value
    assert data["to"] == dest.value
    assert data["trigger"] == trigger
    assert data["reason"] == "test"
    assert level == (logging.ERROR if dest is State.CRASHED else logging.INFO)


def test_boot_failure_emits_boot_with_error_then_crash() -> None:
    life, rec = machine_in(State.BOOTING)
    assert life.boot_failed(error="db down", error_type="OperationalError", exit_code=1)
    assert [e for e, _, _ in rec.events] == ["WORKER_BOOT", "WORKER_CRASH"]
    boot = rec.events[0][1]
    assert boot["db_status"] == "error"
    assert boot["error"] == "db down"
    assert rec.statuses == [State.CRASHED]


INVALID = [
    (t, state)
    for state in State
    for t in {name for name, _, _ in TRANSITIONS}
    if not any(t == name and state in sources for name, sources, _ in TRANSITIONS)
]


@pytest.mark.parametrize(("trigger", "state"), INVALID)
def test_invalid_trigger_is_refused_without_side_effects(trigger: str, state: State) -> None:
    life, rec = machine_in(state)
    assert getattr(life, trigger)() is False
    assert life.state is state
    assert rec.events == []
    assert rec.statuses == []


def test_second_drain_is_refused_so_the_caller_can_escalate() -> None:
    life, _ = machine_in(State.RUNNING)
    assert life.drain() is True
    assert life.drain() is False
    assert life.abandon(drained=False, exit_code=143) is True
    assert life.state is State.STOPPED


def test_every_state_is_reachable_and_terminal_states_have_no_exit() -> None:
    dests = {d for _, _, d in TRANSITIONS}
    assert dests | {State.BOOTING} == set(State)
    sources = {s for _, ss, _ in TRANSITIONS for s in ss}
    assert State.STOPPED not in sources and State.CRASHED not in sources
