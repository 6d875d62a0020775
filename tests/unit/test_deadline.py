"""The handler deadline in process: interrupts a Python loop, leaves a C call to the exit
path, and never lets an interrupt land outside the call it was meant for."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from backend.jobs import Job, job_from_envelope
from backend.workers.deadline import Call, Deadline, JobDeadlineExceeded
from tests.helpers import job


def a_job(key: str = "k1") -> Job:
    return job_from_envelope(job(key), msg_id=7, queue_name="q_probe", attempt=2)


def never(call: Call) -> None:
    raise AssertionError(f"no call should be left hung: {call}")


def test_a_python_loop_is_interrupted_at_its_deadline_with_its_stack() -> None:
    deadline = Deadline(deadline_s=0.2, on_hung=never)
    deadline.start()
    started = time.monotonic()
    with pytest.raises(JobDeadlineExceeded), deadline.watch([a_job()], backend_pid=123):
        while True:
            time.sleep(0.01)  # the loop line
    took = time.monotonic() - started
    assert 0.2 <= took < 1.0
    call = deadline.take_expired()
    assert call is not None and call.key == "k1" and call.backend_pid == 123
    assert any("test_deadline.py" in frame and "in test_a_python_loop" in frame for frame in call.stack)
    assert deadline.take_expired() is None  # once
    assert deadline.in_hand() is None


def test_a_call_that_returns_in_time_is_left_alone() -> None:
    deadline = Deadline(deadline_s=0.5, on_hung=never)
    deadline.start()
    for _ in range(5):
        with deadline.watch([a_job()]):
            time.sleep(0.02)
    time.sleep(0.6)  # past the deadline of a call that is over: nothing may land here
    assert deadline.take_expired() is None


def test_a_call_blocked_in_c_is_left_to_the_exit_path_after_the_grace() -> None:
    hung: list[Call] = []
    reader, writer = socket.socketpair()
    raised: list[BaseException] = []
    deadline = Deadline(deadline_s=0.2, grace_s=0.3, on_hung=hung.append)
    deadline.start()

    def blocked() -> None:
        try:
            with deadline.watch([a_job("stuck")]):
                reader.recv(1)  # blocked in C: the interrupt waits for it to return
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=blocked)
    started = time.monotonic()
    thread.start()
    while not hung and time.monotonic() - started < 5:
        time.sleep(0.02)
    assert hung and hung[0].key == "stuck", "on_hung was not called"
    assert 0.5 <= time.monotonic() - started < 2.0
    assert any("in blocked" in frame for frame in hung[0].stack)
    writer.send(b"x")  # let it go: the pending interrupt lands as the call returns
    thread.join(5)
    assert [type(e) for e in raised] == [JobDeadlineExceeded]
    reader.close()
    writer.close()


def test_an_interrupt_never_lands_after_its_call_has_ended() -> None:
    """Calls that end right at their deadline: the interrupt lands inside the call or not
    at all, never in the code after it."""
    deadline = Deadline(deadline_s=0.02, on_hung=never)
    deadline.start()
    rng = random.Random(5)
    interrupted = 0
    for _ in range(150):
        try:
            with deadline.watch([a_job()]):
                until = time.monotonic() + rng.uniform(0.012, 0.03)
                while time.monotonic() < until:
                    pass
        except JobDeadlineExceeded:
            interrupted += 1
            assert deadline.take_expired() is not None
        # A stray interrupt would be raised here, outside any watch, and fail the test.
        until = time.monotonic() + 0.01
        while time.monotonic() < until:
            pass
    assert 0 < interrupted < 150


def test_in_hand_names_the_job_and_adds_the_stack_once_it_runs_long() -> None:
    deadline = Deadline(deadline_s=10, on_hung=never, stack_after_s=0.2)
    seen: list[dict[str, object] | None] = []

    def look() -> None:
        time.sleep(0.05)
        seen.append(deadline.in_hand())
        time.sleep(0.3)
        seen.append(deadline.in_hand())

    looker = threading.Thread(target=look)
    with deadline.watch([a_job("k9"), a_job("k10")]):
        looker.start()
        looker.join()
    first, later = seen
    assert first is not None and later is not None
    assert (first["key"], first["jobs"], first["msg_id"], first["attempt"]) == ("k9", 2, 7, 2)
    assert "stack" not in first
    stack = later["stack"]
    assert isinstance(stack, list) and "in _wait_for_tstate_lock" in stack[-1]  # innermost last
    assert any("in test_in_hand_names_the_job" in frame for frame in stack)
    assert deadline.in_hand() is None


def test_a_pause_of_the_whole_process_does_not_count_against_the_deadline() -> None:
    """A stalled clock (the process stopped for 5 s) moves the call's start, not its end."""
    now = [0.0]
    deadline = Deadline(deadline_s=3, on_hung=never, clock=lambda: now[0])
    deadline.start()
    with deadline.watch([a_job()]):
        time.sleep(0.3)
        now[0] += 5.0  # the process did not run for 5 s
        time.sleep(0.3)
        now[0] += 0.5
        time.sleep(0.3)
    assert deadline.take_expired() is None
