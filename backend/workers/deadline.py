"""A deadline for every handler call (``WORKER_JOB_TIMEOUT_S``).

The handler runs on the main thread inside ``Deadline.watch``. The ``deadline`` thread
looks at the call in hand a few times a second. Past its deadline it raises
``JobDeadlineExceeded`` in the main thread (``PyThreadState_SetAsyncExc``: it lands at the
handler's next Python instruction, so a loop or a chain of calls is interrupted, a C call
such as a socket read with no timeout is not). If the call has not given control back
within the grace that follows, the thread calls ``on_hung``, which records the attempt on a
connection of its own and ends the process (the runtime's ``_on_hung_job``).

While a call is in hand, ``in_hand`` describes it for the heartbeat row: the job, since
when, and once it has run long, the main thread's stack, sampled on the calling thread.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from backend.jobs import Job

# A tick this much later than asked means the process was not running.
_STALL_S = 1.0
# Frames kept of a stack: the innermost ones, where the call waits.
STACK_FRAMES = 8
_ROOT = os.getcwd()


class JobDeadlineExceeded(BaseException):
    """Raised inside a handler that ran past its deadline. Not an ``Exception``, like
    ``KeyboardInterrupt``: a handler's own ``except Exception`` must not swallow it."""


@dataclass(kw_only=True, eq=False)
class Call:
    """One handler call in hand: its jobs (one, or a transactional batch), when it started,
    and the loop connection's server process (which the exit path ends)."""

    jobs: Sequence[Job]
    deadline_s: float
    started: float  # monotonic
    started_wall: float  # time.time()
    thread_id: int
    backend_pid: int | None
    interrupted_at: float | None = None
    stack: list[str] = field(default_factory=list)  # at the deadline, innermost last

    @property
    def key(self) -> str:
        return self.jobs[0].idempotency_key

    def age_s(self, now: float) -> float:
        return now - self.started


def format_stack(frame: FrameType | None, limit: int = STACK_FRAMES) -> list[str]:
    """``file:line in function`` for the innermost ``limit`` frames, innermost last; paths
    relative to the working directory where they are under it."""
    if frame is None:
        return []
    lines = []
    for fs in traceback.extract_stack(frame)[-limit:]:
        path = fs.filename
        if path.startswith(_ROOT + os.sep):
            path = path[len(_ROOT) + 1 :]
        lines.append(f"{path}:{fs.lineno} in {fs.name}")
    return lines


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Set (or with None, clear) the exception pending for a thread."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


class Deadline:
    """Bounds the handler calls made inside ``watch``."""

    def __init__(
        self,
        *,
        deadline_s: float,
        on_hung: Callable[[Call], None],
        grace_s: float = 2.0,
        stack_after_s: float = 90.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deadline_s = deadline_s
        self.grace_s = grace_s
        self.stack_after_s = stack_after_s  # the heartbeat shows the stack of a call this old
        self.on_hung = on_hung
        self.clock = clock
        self._tick_s = max(0.01, min(0.25, deadline_s / 20))
        self._lock = threading.Lock()  # the interrupt and the end of a call exclude each other
        self._call: Call | None = None
        self._expired: Call | None = None
        self._raised: Call | None = None  # the last call, if it ended in an exception
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="deadline", daemon=True)
            self._thread.start()

    @contextmanager
    def watch(self, jobs: Sequence[Job], backend_pid: int | None = None) -> Iterator[None]:
        """Run the block as one handler call of ``jobs`` under the deadline."""
        call = Call(
            jobs=jobs,
            deadline_s=self.deadline_s,
            started=self.clock(),
            started_wall=time.time(),
            thread_id=threading.get_ident(),
            backend_pid=backend_pid,
        )
        self._call, self._raised = call, None
        failed = True
        try:
            yield
            failed = False
        finally:
            while True:
                try:
                    self._leave(call, failed=failed)
                    break
                except JobDeadlineExceeded:
                    continue  # delivered as the call ended: it is over either way

    def _leave(self, call: Call, *, failed: bool) -> None:
        """End the call. An interrupt not delivered yet is withdrawn, so it never lands
        outside the handler; a call interrupted that ended in an exception has expired. One
        that returned (just late, or swallowing the interrupt) ends as it says."""
        with self._lock:
            self._call = None
            if failed:
                self._raised = call
            if call.interrupted_at is not None:
                _raise_in(call.thread_id, None)
                if failed:
                    self._expired = call

    def take_expired(self) -> Call | None:
        """The call interrupted at its deadline since the last look, if any (once)."""
        with self._lock:
            call, self._expired = self._expired, None
        return call

    def keys_in_hand(self) -> list[str]:
        """The keys of the call in hand, or of the last call if it raised (a crash names
        them: a ``MemoryError`` from a handler reaches the runtime after its call ended)."""
        call = self._call or self._raised
        return [job.idempotency_key for job in call.jobs] if call else []

    def in_hand(self) -> dict[str, Any] | None:
        """The call in hand for the heartbeat row; its stack once it has run long."""
        call = self._call
        if call is None:
            return None
        job = call.jobs[0]
        data: dict[str, Any] = {
            "key": job.idempotency_key,
            "msg_id": job.msg_id,
            "jobs": len(call.jobs),
            "attempt": job.attempt,
            "since": datetime.fromtimestamp(call.started_wall, UTC).isoformat(),
            "deadline_s": call.deadline_s,
        }
        if call.age_s(self.clock()) >= self.stack_after_s:
            data["stack"] = format_stack(sys._current_frames().get(call.thread_id))
        return data

    def _run(self) -> None:
        last = self.clock()
        while True:
            time.sleep(self._tick_s)
            now = self.clock()
            late, last = now - last - self._tick_s, now
            call = self._call
            if call is None:
                continue
            if late > _STALL_S:
                # The whole process did not run (SIGSTOP, a stalled container): the deadline
                # bounds the handler's running time, so that pause does not count.
                call.started += late
                if call.interrupted_at is not None:
                    call.interrupted_at += late
            if call.interrupted_at is None:
                if call.age_s(now) >= call.deadline_s:
                    self._interrupt(call, now)
            elif now - call.interrupted_at >= self.grace_s and self._call is call:
                self.on_hung(call)
                return  # the process is ending

    def _interrupt(self, call: Call, now: float) -> None:
        with self._lock:
            if self._call is not call:
                return  # it ended meanwhile
            call.stack = format_stack(sys._current_frames().get(call.thread_id))
            call.interrupted_at = now
            _raise_in(call.thread_id, JobDeadlineExceeded)
