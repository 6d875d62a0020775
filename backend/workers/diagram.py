"""The lifecycle machine drawn as a Mermaid ``stateDiagram-v2``, built from its definition.

``docs/ARCHITECTURE.md`` embeds the drawing between two markers, and
``tests/unit/test_docs.py`` fails when the embedded copy and the machine disagree.
``scripts/state_diagram.py`` prints it, or rewrites the embedded copy with ``--write``.
This module has no ``__main__`` guard on purpose: every program under
``backend/workers`` is a worker that needs a Railway service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backend.workers.lifecycle import EVENTS, TRANSITIONS, Lifecycle, State

START_MARKER = "<!-- state-diagram:start -->"
END_MARKER = "<!-- state-diagram:end -->"
_FENCE_OPEN = "```mermaid"
_FENCE_CLOSE = "```"

Transition = tuple[str, tuple[State, ...], State]


def initial_state() -> State:
    """The state a new machine starts in, read from the machine itself."""
    return Lifecycle(emit=_ignore_event, write_status=_ignore_status).state


def state_diagram(
    transitions: Sequence[Transition] = TRANSITIONS,
    events: Mapping[State, str] = EVENTS,
    initial: State | None = None,
) -> str:
    """Mermaid text of the machine: one arrow per (source, destination) pair, labelled
    with its triggers and the event the destination emits; final states lead to ``[*]``.

    Arrows are ordered by source state (in ``State`` order), then as the table lists them.
    """
    start = initial_state() if initial is None else initial
    order = list(State)
    edges: dict[tuple[State, State], list[str]] = {}
    for trigger, sources, dest in transitions:
        for source in sources:
            triggers = edges.setdefault((source, dest), [])
            if trigger not in triggers:
                triggers.append(trigger)
    # Stable sort: within one source, the table's order is kept.
    pairs = sorted(edges, key=lambda pair: order.index(pair[0]))
    lines = ["stateDiagram-v2", f"    [*] --> {start.value}"]
    for source, dest in pairs:
        label = ", ".join(edges[(source, dest)])
        event = events.get(dest)
        if event:
            label += f" / {event}"
        lines.append(f"    {source.value} --> {dest.value} : {label}")
    origins = {source for source, _ in edges}
    finals = [state for state in order if state not in origins and any(dest is state for _, dest in edges)]
    lines.extend(f"    {state.value} --> [*]" for state in finals)
    return "\n".join(lines) + "\n"


def embedded_block(diagram: str) -> str:
    """The markers, the fenced Mermaid text, and nothing else."""
    return f"{START_MARKER}\n{_FENCE_OPEN}\n{diagram.rstrip()}\n{_FENCE_CLOSE}\n{END_MARKER}"


def extract_embedded(document: str) -> str:
    """The Mermaid text between the markers of ``document``; ``ValueError`` when the
    markers or the fence are missing."""
    start = document.find(START_MARKER)
    end = document.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"no {START_MARKER} ... {END_MARKER} block")
    inner = document[start + len(START_MARKER) : end].strip()
    if not (inner.startswith(_FENCE_OPEN + "\n") and inner.endswith("\n" + _FENCE_CLOSE)):
        raise ValueError(f"the block between the markers is not one {_FENCE_OPEN} fence")
    return inner[len(_FENCE_OPEN) + 1 : -len(_FENCE_CLOSE)].rstrip() + "\n"


def replace_embedded(document: str, diagram: str) -> str:
    """``document`` with the block between its markers replaced by ``diagram``."""
    start = document.find(START_MARKER)
    end = document.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"no {START_MARKER} ... {END_MARKER} block")
    return document[:start] + embedded_block(diagram) + document[end + len(END_MARKER) :]


def main() -> None:
    """Print the diagram (``scripts/state_diagram.py`` without options)."""
    print(state_diagram(), end="")


def _ignore_event(event: str, data: Mapping[str, Any], level: int) -> None:
    """A new machine emits nothing until its first trigger; nothing to do."""


def _ignore_status(state: State) -> None:
    """See ``_ignore_event``."""
