"""SIGTERM/SIGINT handling that never runs logic inside a signal handler.

The C-level handler writes the signal number to a wakeup socket; a watcher thread reads
it and calls ``on_signal`` with the count so far. So a signal is acted on at once even
while the main thread is blocked inside a psycopg call, and nothing is ever raised into it.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)


class SignalWatcher:
    """Counts SIGTERM/SIGINT and reports each one from its own thread."""

    def __init__(self, on_signal: Callable[[signal.Signals, int], None]) -> None:
        self._on_signal = on_signal
        self._count = 0
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(True)
        self._writer.setblocking(False)
        self._thread = threading.Thread(target=self._watch, name="signal-watcher", daemon=True)

    def install(self) -> None:
        """Call from the main thread, before any long operation."""
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._noop)
        self._thread.start()

    @staticmethod
    def _noop(signum: int, frame: FrameType | None) -> None:
        """The Python-level handler does nothing: the wakeup byte carries the signal."""

    def _watch(self) -> None:
        while True:
            data = self._reader.recv(64)
            if not data:
                return
            for byte in data:
                try:
                    sig = signal.Signals(byte)
                except ValueError:
                    continue
                if sig in HANDLED:
                    self._count += 1
                    self._on_signal(sig, self._count)
