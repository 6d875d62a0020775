"""``SignalWatcher`` in a process of its own: installing it takes over the process's
SIGTERM/SIGINT and its wakeup fd, which the test runner's process must keep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from backend.db.embedded import PROJECT_ROOT

# The main thread blocks in a socket read, as a worker's does inside psycopg; the watcher's
# callback prints from its own thread and, at the third signal, wakes the main thread.
_CHILD = """
import socket, sys, threading
from backend.workers.signals import SignalWatcher

wake, waker = socket.socketpair()

def on_signal(sig, count):
    print(sig.name, count, threading.current_thread().name, flush=True)
    if count == 3:
        waker.send(b"x")

SignalWatcher(on_signal).install()
print("ready", flush=True)
wake.settimeout(10)
try:
    wake.recv(1)
except TimeoutError:
    sys.exit("the main thread was never woken")
print("woken", flush=True)
"""


def test_each_signal_is_reported_from_the_watcher_thread_with_its_count() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        # Each read ends by the child's own bound (its 10 s wait), and a signal is sent only
        # once the previous one is reported, so the kernel cannot merge two of them.
        assert child.stdout.readline() == "ready\n"
        reports = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            os.kill(child.pid, sig)
            reports.append(child.stdout.readline().strip())
        assert reports == [
            "SIGTERM 1 signal-watcher",
            "SIGINT 2 signal-watcher",
            "SIGTERM 3 signal-watcher",
        ]
        # The blocked main thread carried on: nothing was raised into it.
        assert child.stdout.readline() == "woken\n"
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
