"""``Stopping``: how a worker stops (docs/ARCHITECTURE.md, "Signals"). A stop drains: the
loop finishes the batch in hand; the ``drain-deadline`` thread abandons it past
``WORKER_DRAIN_TIMEOUT_S``, and so does a second signal. The memory soft limit drains the
same way and ends as the memory crash it is (exit 1).

The ``Runtime`` builds one and forwards its ``on_signal`` and ``stop`` to it; the loop and
boot watch ``requested``, the drain deadline watches ``loop_done``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from psycopg_pool import ConnectionPool

from backend.events import Event
from backend.logs import log_event
from backend.workers.held import Counters, HeldJobs, give_back
from backend.workers.lifecycle import Lifecycle, State
from backend.workers.memory import MemoryVerdict
from backend.workers.reports import EXIT_FAILURE, EXIT_SIGNAL, shutdown_data
from backend.workers.status import HeartbeatWriter

__all__ = ["MEMORY_REASON", "SIGNAL_REASONS", "Stopping"]

SIGNAL_REASONS = {signal.SIGTERM: "SIGTERM (Deployment/Scale-down)", signal.SIGINT: "SIGINT (Interrupt)"}
MEMORY_REASON = "memory soft limit"
# An abandon (second signal, drain timeout) gives back what it held and writes its state
# within these, so that it ends the process within a second on any network.
_ABANDON_RELEASE_S, _ABANDON_STATUS_S = 0.5, 0.3


class Stopping:
    """A worker's stop: requested once (a signal, ``stop()``, the memory soft limit), drained
    within the drain timeout, abandoned past it or on a second signal.

    ``wake`` ends the loop's idle wait; ``memory_crash_data`` builds the data of the memory
    limit's ``WORKER_CRASH``, ``shutdown_data`` that of ``WORKER_SHUTDOWN``."""

    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        heartbeat: HeartbeatWriter,
        held: HeldJobs,
        pool: Callable[[], ConnectionPool[Any] | None],
        queue: str,
        worker_id: str,
        drain_timeout_s: float,
        in_flight: Callable[[], int],
        wake: Callable[[], None],
        counters: Counters,
        uptime: Callable[[], float],
        memory_crash_data: Callable[..., dict[str, Any]],
    ) -> None:
        self._lifecycle, self._heartbeat = lifecycle, heartbeat
        self._held, self._pool = held, pool
        self._queue, self._worker_id = queue, worker_id
        self._drain_timeout_s = drain_timeout_s
        self._in_flight, self._wake = in_flight, wake
        self._counters, self._uptime = counters, uptime
        self._memory_crash_data = memory_crash_data
        self.requested = threading.Event()
        self.loop_done = threading.Event()
        self.reason = ""
        self.memory: MemoryVerdict | None = None  # set when the memory soft limit drains it

    def on_signal(self, sig: signal.Signals, count: int) -> None:
        """The first SIGTERM/SIGINT drains; a second one abandons in-flight work (exit 143)."""
        if count == 1:
            # Already draining (the memory soft limit): the first signal changes nothing.
            self.stop(SIGNAL_REASONS.get(sig, sig.name))
        else:
            self.abandon(f"second signal ({sig.name}) while draining")

    def stop(self, reason: str) -> None:
        """Drain: finish the in-flight batch, then stop; abandon past the drain timeout."""
        if self.requested.is_set():
            return
        self.reason = reason
        in_flight = self._in_flight()
        # Stop and arm the deadline first: the transition writes the heartbeat, which can
        # hang on a dead network, and a second signal must still be able to abandon.
        self.requested.set()
        self._wake()
        threading.Thread(target=self._drain_deadline, name="drain-deadline", daemon=True).start()
        self.enter_draining(in_flight)

    def enter_draining(self, in_flight: int | None = None) -> None:
        """Move to DRAINING if not there yet. Called by the stopping thread and, in case it
        has not got that far, by the main thread before it finishes: whichever is first
        emits WORKER_DRAINING, the other's trigger is refused."""
        if self._lifecycle.state in (State.BOOTING, State.RUNNING):
            self._lifecycle.drain(
                reason=self.reason,
                in_flight=self._in_flight() if in_flight is None else in_flight,
                drain_timeout_s=self._drain_timeout_s,
            )

    def _drain_deadline(self) -> None:
        if not self.loop_done.wait(self._drain_timeout_s):
            self.abandon(f"drain timeout ({self._drain_timeout_s:g} s)")

    def abandon(self, why: str) -> None:
        """Stop now: the open transaction dies with the process and rolls back.

        A memory drain that cannot finish still ends as the memory crash it is (exit 1)."""
        self.reason = self.reason or why
        self.enter_draining()
        if self.memory is not None:
            changed = self._lifecycle.crash(**self._memory_crash_data(drained=False, abandoned=why))
            code = EXIT_FAILURE
        else:
            changed = self._lifecycle.abandon(
                **self.shutdown_data(drained=False, exit_code=EXIT_SIGNAL),
                abandoned=why,
                in_flight=self._in_flight(),
            )
            code = EXIT_SIGNAL
        if not changed:
            return
        # Bounded, whatever the network does: a second signal ends the process within a second.
        releasing = threading.Thread(target=self._release_held, name="release", daemon=True)
        releasing.start()
        releasing.join(_ABANDON_RELEASE_S)
        self._heartbeat.flush(_ABANDON_STATUS_S)
        logging.shutdown()
        os._exit(code)

    def shutdown_data(self, *, drained: bool, exit_code: int) -> dict[str, Any]:
        """The data of ``WORKER_SHUTDOWN``: why it stopped, whether it drained, what it did."""
        return shutdown_data(
            reason=self.reason,
            drained=drained,
            uptime_s=self._uptime(),
            counters=self._counters,
            exit_code=exit_code,
        )

    def _release_held(self) -> None:
        pool = self._pool()
        if pool is not None:
            give_back(self._held, pool, queue=self._queue, worker_id=self._worker_id)

    def on_memory_exceeded(self, verdict: MemoryVerdict) -> None:
        """The housekeeping thread saw the memory soft limit: drain, then crash (exit 1)."""
        # Already stopping for a signal: that drain ends the process anyway (exit 0).
        if self.memory is None and not self.requested.is_set():
            self.memory = verdict
            log_event(
                Event.WORKER_MEMORY_SOFT_LIMIT,
                {"worker_id": self._worker_id, **verdict.figures()},
                logging.WARNING,
            )
            self.stop(MEMORY_REASON)
