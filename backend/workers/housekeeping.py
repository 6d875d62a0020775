"""The housekeeping thread: heartbeats, lease extension, memory samples, retention.

It has its own pooled connection, so heartbeats go on while the job loop is busy, blocked
or draining, and a database outage here never touches the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from backend.db import ledger, upkeep
from backend.db import queries as q
from backend.errors import describe
from backend.events import Event
from backend.logs import log_event
from backend.workers.held import Counters, HeldJobs
from backend.workers.memory import MemoryVerdict, check_memory

# How long a duty waits for a pooled connection; a stop waits at most about this long.
_POOL_WAIT_S = 2.0
# A housekeeping wait that ends this much later than asked means the process was not running.
_STALL_MIN_S = 2.0


@dataclass(frozen=True, kw_only=True)
class HousekeepingPlan:
    """What the thread does, and how often."""

    queue: str
    worker_id: str
    heartbeat_interval_s: float
    lease_s: int
    memory_limit_bytes: int | None
    memory_soft_pct: float
    memory_check_interval_s: float
    progress_interval_s: float
    prune_interval_s: float
    sample_interval_s: float = 60.0
    ledger_retention_days: float
    heartbeat_retention_days: float

    @property
    def maintenance_limit_ms(self) -> int:
        """The bound of the thread's own transactions (retention, queue samples): a third of
        the lease. This thread extends the leases of running jobs every third of a lease, so
        a duty held up by a lock never lets them lapse; and a batch whose claim waits on rows
        a chunk of retention locks gets them back well within its own bound, the lease."""
        return max(1, self.lease_s * 1000 // 3)

    @property
    def tick_s(self) -> float:
        return max(0.01, min(self.heartbeat_interval_s, self.memory_check_interval_s, self.lease_s / 3))


class Housekeeper:
    """Runs the periodic duties until ``stop`` is called."""

    def __init__(
        self,
        plan: HousekeepingPlan,
        pool: ConnectionPool[Any],
        *,
        beat: Callable[[], None],
        held: HeldJobs,
        on_memory_exceeded: Callable[[MemoryVerdict], None],
        counters: Counters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan
        self.pool = pool
        self._beat = beat
        self.held = held
        self.on_memory_exceeded = on_memory_exceeded
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)
        self._failing: set[str] = set()
        self.last_rss = 0
        self.peak_rss = 0  # the highest sample so far: a killed worker's row keeps it
        self._pruning = False  # a retention pass is under way (its next slice is due)
        self.counters = counters or Counters()
        self._reported = (self.counters.processed, self.counters.failed, clock())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=_POOL_WAIT_S + 0.5)

    def _run(self) -> None:
        now = self.clock()
        due = {
            "beat": now + self.plan.heartbeat_interval_s,
            "lease": now + self.plan.lease_s / 3,
            "memory": now,
            "prune": now + min(5.0, self.plan.prune_interval_s),
            "progress": now + self.plan.progress_interval_s,
            "sample": now + min(5.0, self.plan.sample_interval_s),
        }
        while True:
            sleep_s = self._sleep_until(min(due.values()))
            asleep_at = self.clock()
            if self._stop.wait(sleep_s):
                return
            now = self.clock()
            self._notice_stall(now - asleep_at - sleep_s)
            if now >= due["memory"]:
                due["memory"] = now + self.plan.memory_check_interval_s
                self._check_memory()
            if now >= due["lease"]:
                due["lease"] = now + self.plan.lease_s / 3
                self._guard(Event.LEASE_EXTEND_FAILED, self._extend_leases)
            if now >= due["progress"]:
                due["progress"] = now + self.plan.progress_interval_s
                if self._progress(now):  # the row's counters as fresh as the line
                    due["beat"] = now
            if now >= due["beat"]:
                due["beat"] = now + self.plan.heartbeat_interval_s
                self._guard(Event.HEARTBEAT_FAILED, self.beat)
            if now >= due["sample"]:
                due["sample"] = now + self.plan.sample_interval_s
                self._guard(Event.SAMPLE_FAILED, self._sample)
            if now >= due["prune"]:
                self._guard(Event.PRUNE_FAILED, self._prune)
                # A pass is done when nothing old is left: until then, the next slice at
                # the next tick, between the other duties (a heartbeat is never held up).
                due["prune"] = now + (0.0 if self._pruning else self.plan.prune_interval_s)

    def _sample(self) -> None:
        with self.pool.connection(timeout=_POOL_WAIT_S) as conn:
            q.sample_queue(
                conn, self.plan.queue, self.plan.sample_interval_s, limit_ms=self.plan.maintenance_limit_ms
            )

    def _progress(self, now: float) -> bool:
        """While jobs flow, say how many were done and failed since the last line, how fast,
        and what is left; say nothing while idle. True when a line was written."""
        done, failed = self.counters.processed, self.counters.failed
        last_done, last_failed, last_at = self._reported
        if (done, failed) == (last_done, last_failed):
            self._reported = (done, failed, now)
            return False
        self._reported = (done, failed, now)
        depth: int | None = None
        try:
            with self.pool.connection(timeout=_POOL_WAIT_S) as conn:
                depth = q.queue_depth(conn, self.plan.queue)
        except (psycopg.Error, TimeoutError, OSError):
            pass  # the line is still worth writing; an outage has its own events
        elapsed = max(now - last_at, 1e-9)
        log_event(
            Event.WORKER_PROGRESS,
            {
                "worker_id": self.plan.worker_id,
                "queue": self.plan.queue,
                "done": done - last_done,
                "failed": failed - last_failed,
                "seconds": round(elapsed, 3),
                "rate_per_s": round((done - last_done) / elapsed, 1),
                "queue_depth": depth,
                "jobs_processed": done,
                "jobs_failed": failed,
            },
        )
        return True

    def _notice_stall(self, late_s: float) -> None:
        """A wait that ended far later than asked: the whole process did not run (SIGSTOP, a
        stalled container, a starved CPU). Said once it runs again, since nothing else would."""
        if late_s > _STALL_MIN_S:
            log_event(
                Event.WORKER_STALLED,
                {
                    "worker_id": self.plan.worker_id,
                    "stalled_s": round(late_s, 3),
                    "consequence": "a transaction open for longer than the visibility timeout was ended"
                    " by the server, and its work went to other workers",
                },
                logging.WARNING,
            )

    def _sleep_until(self, when: float) -> float:
        return max(0.0, min(self.plan.tick_s, when - self.clock()))

    def _guard(self, event: Event, duty: Callable[[], None]) -> None:
        """Run one duty; log its first failure and its recovery, not every tick between."""
        try:
            duty()
        except (psycopg.Error, OSError) as exc:
            if event not in self._failing:
                self._failing.add(event)
                log_event(
                    event,
                    {
                        "worker_id": self.plan.worker_id,
                        "error": describe(exc),
                        "error_type": type(exc).__name__,
                    },
                    logging.WARNING,
                )
            return
        if event in self._failing:
            self._failing.discard(event)
            log_event(Event.HOUSEKEEPING_RECOVERED, {"worker_id": self.plan.worker_id, "duty": event})

    def beat(self) -> None:
        self._beat()

    def _check_memory(self) -> None:
        verdict = check_memory(self.plan.memory_limit_bytes, self.plan.memory_soft_pct)
        self.last_rss = verdict.rss_bytes
        self.peak_rss = max(self.peak_rss, verdict.rss_bytes)
        if verdict.over:
            self.on_memory_exceeded(verdict)

    def _extend_leases(self) -> None:
        msg_ids, keys = self.held.leased()
        if not msg_ids and not keys:
            return
        with self.pool.connection(timeout=_POOL_WAIT_S) as conn:
            ledger.extend_leases(
                conn,
                queue=self.plan.queue,
                worker_id=self.plan.worker_id,
                msg_ids=msg_ids,
                keys=keys,
                lease_s=self.plan.lease_s,
                limit_ms=self.plan.maintenance_limit_ms,
            )

    def _prune(self) -> None:
        with self.pool.connection(timeout=_POOL_WAIT_S) as conn:
            self._pruning = False  # after an error, the next pass comes at the interval
            result = upkeep.prune(
                conn,
                ledger_days=self.plan.ledger_retention_days,
                heartbeat_days=self.plan.heartbeat_retention_days,
                limit_ms=self.plan.maintenance_limit_ms,
            )
            if result is None or result.done:
                q.prune_deliveries(conn, self.plan.queue, limit_ms=self.plan.maintenance_limit_ms)
        self._pruning = result is not None and not result.done
        if result and (result.ledger_rows or result.heartbeat_rows or result.dead_letter_rows):
            log_event(
                Event.RETENTION_PRUNED,
                {
                    "ledger_rows": result.ledger_rows,
                    "heartbeat_rows": result.heartbeat_rows,
                    "dead_letter_rows": result.dead_letter_rows,
                },
            )
