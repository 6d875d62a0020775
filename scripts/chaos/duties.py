"""The run's background threads: the producer, which enqueues the plan's waves at their
times, and the restarter, which stops PostgreSQL and starts it again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from backend.db.embedded import EmbeddedPostgres
from scripts.chaos.audit import Conn
from scripts.chaos.database import DB_ERRORS, connect, enqueue_wave
from scripts.chaos.schedule import DbRestart
from scripts.chaos.workload import Item, Plan


class Producer(threading.Thread):
    """Enqueues the plan's waves at their times, as an application would, retrying outages."""

    def __init__(
        self, url: str, plan: Plan, offsets: Sequence[float], t0: float, abort: threading.Event
    ) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.plan, self.offsets, self.t0, self.abort = url, plan, offsets, t0, abort
        self.waves_done = 0
        self.error: str | None = None

    def run(self) -> None:
        conn: Conn | None = None
        try:
            for index, (offset, items) in enumerate(zip(self.offsets, self.plan.waves, strict=True)):
                if self.abort.wait(max(0.0, self.t0 + offset - time.monotonic())):
                    return
                conn = self._enqueue(conn, index, items)
                if self.abort.is_set():
                    return
                self.waves_done += 1
        except Exception as exc:  # reported as a failed run, not a silent thread death
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if conn is not None:
                conn.close()

    def _enqueue(self, conn: Conn | None, index: int, items: Sequence[Item]) -> Conn | None:
        while not self.abort.is_set():
            try:
                conn = conn if conn is not None and not conn.closed else connect(self.url)
                enqueue_wave(conn, index, items)
                return conn
            except DB_ERRORS:
                if conn is not None:
                    conn.close()
                conn = None
                self.abort.wait(0.5)
        return conn


class DbRestarter(threading.Thread):
    """Stops PostgreSQL at the scheduled time and starts it again after the downtime."""

    def __init__(
        self,
        server: EmbeddedPostgres,
        restart: DbRestart,
        t0: float,
        abort: threading.Event,
        log: Callable[[str], None],
    ) -> None:
        super().__init__(name="db-restart", daemon=True)
        self.server, self.restart, self.t0, self.abort, self.log = server, restart, t0, abort, log
        self.stopped_wall: float | None = None
        self.started_wall: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        if self.abort.wait(max(0.0, self.t0 + self.restart.at_s - time.monotonic())):
            return
        self.log(f"PostgreSQL stop ({self.restart.mode})")
        try:
            self.server.stop(self.restart.mode)
            self.stopped_wall = time.time()
            self.abort.wait(self.restart.down_s)  # the outage itself
        except Exception as exc:  # recorded; the server is started below regardless
            self.error = f"stop: {type(exc).__name__}: {exc}"
        try:
            self.server.start()
            self.started_wall = time.time()
            self.log("PostgreSQL started again")
        except Exception as exc:
            self.error = f"start: {type(exc).__name__}: {exc}"
