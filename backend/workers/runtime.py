"""``Runtime``: runs one worker: boot, the lifecycle, draining, crashes and exit codes
(docs/ARCHITECTURE.md, "The lifecycle state machine"). The fetch loop is the
``Consumer``'s; the processing of a delivery is the worker kind's ``Processor``, built
once boot has learnt what it needs (``BootFacts``).

The runtime installs no signal handler: the entry point (``backend.workers.entry``) does,
and forwards signals to ``on_signal``; in a test, ``stop()`` drains it the same way. Both
are ``Stopping``'s, which the runtime builds.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from backend.db.connect import DB_ERRORS, connect, make_pool, resolve_db_url
from backend.dburl import secrets_of
from backend.errors import JobTimedOut
from backend.events import Event
from backend.logs import add_secret, log_event
from backend.workers.base import BaseWorker, TransactionalWorker
from backend.workers.boot import (
    BootFacts,
    boot_database,
    check_kind,
    housekeeping_plan,
    identity,
    make_processor,
)
from backend.workers.consumer import Consumer
from backend.workers.crash_record import DeliveryLog
from backend.workers.deadline import Call, Deadline
from backend.workers.held import Counters, HeldJobs
from backend.workers.housekeeping import Housekeeper
from backend.workers.last_resort import failure_url
from backend.workers.lifecycle import Lifecycle, State
from backend.workers.memory import rss_bytes
from backend.workers.processor import Processor
from backend.workers.reports import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_SIGNAL,
    crash_data,
    heartbeat_row,
    kept_failure,
    memory_error,
)
from backend.workers.status import HeartbeatWriter, record_once
from backend.workers.stopping import Stopping

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_SIGNAL", "Runtime"]

_STATUS_WRITE_TIMEOUT_S = 1.0  # short: on a dead network it delays a SIGTERM's exit


class Runtime:
    """Runs ``worker`` until it is stopped; ``run`` returns the exit code."""

    def __init__(self, worker: BaseWorker) -> None:
        check_kind(worker)
        self.worker = worker
        self.settings = settings = worker.settings
        self.queue, self.worker_id = worker.queue, worker.worker_id
        self.started_at = datetime.now(UTC)
        self._started = time.monotonic()
        self.pool: ConnectionPool[Any] | None = None
        self.housekeeper: Housekeeper | None = None
        # Learnt at boot; the processor and the loop that runs it are built from them.
        self.facts: BootFacts | None = None
        self.processor: Processor | None = None
        self.consumer: Consumer | None = None
        self.counters, self.held = Counters(), HeldJobs()
        self.memory_limit_bytes = settings.memory_limit_bytes  # the cgroup's, read once
        self.failure: dict[str, Any] = {}  # why it crashed: kept in the row's metadata
        # The last instance of this queue's worker on this replica, said in WORKER_BOOT.
        self.replica = settings.railway.get("RAILWAY_REPLICA_ID") or settings.hostname
        self.heartbeat = HeartbeatWriter(
            worker_id=self.worker_id, pool=lambda: self.pool, build_row=self.heartbeat_row
        )
        self.lifecycle = Lifecycle(emit=self._emit, write_status=self._write_status)
        self.stopping = Stopping(
            lifecycle=self.lifecycle,
            heartbeat=self.heartbeat,
            held=self.held,
            pool=lambda: self.pool,
            queue=self.queue,
            worker_id=self.worker_id,
            drain_timeout_s=settings.drain_timeout_s,
            in_flight=lambda: self.processor.in_flight if self.processor else 0,
            wake=self._wake_consumer,
            counters=self.counters,
            uptime=self._uptime,
            memory_crash_data=self._memory_crash_data,
        )
        self.stop_requested, self.loop_done = self.stopping.requested, self.stopping.loop_done
        self._db_url: str | None = None
        self.deliveries = (
            DeliveryLog(queue_name=self.queue, worker_id=self.worker_id, open_conn=self._deliveries_conn)
            if isinstance(worker, TransactionalWorker)
            else None
        )
        deadline_s = settings.job_timeout_s
        self.deadline = Deadline(
            deadline_s=deadline_s,
            on_hung=self._on_hung_job,
            # The heartbeat row shows the stack of a call running for a few heartbeats.
            stack_after_s=min(3 * settings.heartbeat_interval_s, deadline_s / 4),
        )

    def _deliveries_conn(self) -> psycopg.Connection[Any]:
        assert self._db_url is not None, "deliveries are recorded only after boot"
        return connect(self._db_url, f"{self.worker_id}:deliveries")

    # --- events and the heartbeat row ----------------------------------------------------

    def _emit(self, event: Event, data: Any, level: int) -> None:
        log_event(event, {**identity(self.worker), **data}, level)

    def heartbeat_row(self) -> dict[str, Any]:
        rss = self.housekeeper.last_rss if self.housekeeper and self.housekeeper.last_rss else rss_bytes()
        return heartbeat_row(
            self.worker,
            status=self.lifecycle.state,
            started_at=self.started_at,
            counters=self.counters,
            rss=rss,
            peak_rss=max(rss, self.housekeeper.peak_rss if self.housekeeper else 0),
            named_sessions=self.facts.sessions_named if self.facts else False,
            deadline=self.deadline,
            stop_reason=self.stop_reason,
            memory_limit_bytes=self.memory_limit_bytes,
            failure=self.failure,
        )

    def _write_status(self, state: State) -> None:
        """Every transition writes the heartbeat row, on the status writer's thread."""
        self.heartbeat.request()

    # --- stopping: the entry points; the work is Stopping's ------------------------------

    def on_signal(self, sig: signal.Signals, count: int) -> None:
        """The first SIGTERM/SIGINT drains; a second one abandons in-flight work (exit 143)."""
        self.stopping.on_signal(sig, count)

    def stop(self, reason: str = "stop requested") -> None:
        """Drain: finish the in-flight batch, then stop; abandon past the drain timeout."""
        self.stopping.stop(reason)

    @property
    def stop_reason(self) -> str:
        return self.stopping.reason

    def _wake_consumer(self) -> None:
        if self.consumer is not None:  # none yet while booting, which sees the stop itself
            self.consumer.wake()

    def _uptime(self) -> float:
        return round(time.monotonic() - self._started, 3)

    # --- boot ----------------------------------------------------------------------------

    def _boot(self) -> BootFacts:
        """Set up the worker, reach the database (retried within the boot budget), check it,
        and return what it said."""
        self.worker.setup()
        url = resolve_db_url(self.settings)
        for secret in secrets_of(url):
            add_secret(secret)
        self._db_url = url
        return boot_database(
            url, self.worker, replica=self.replica, stopping=self.stop_requested, pool=self._pool_of
        )

    def _pool_of(self, url: str) -> ConnectionPool[Any]:
        """The pool, opened once the schema check passed (a failed boot before has none)."""
        if self.pool is None:
            self.pool = make_pool(url, self.worker_id)
            self.pool.open(wait=False)
        return self.pool

    def boot_failed(self, exc: BaseException) -> int:
        data = {"db_status": "error", **self._crash_data(exc)}
        self._record_failure(data)
        if not self.lifecycle.boot_failed(**data):
            # A signal arrived while booting (DRAINING): the failure is still reported.
            self._emit(
                Event.WORKER_BOOT,
                {
                    "from": self.lifecycle.state.value,
                    "to": State.CRASHED.value,
                    "trigger": "boot_failed",
                    **data,
                },
                logging.ERROR,
            )
            self.lifecycle.crash(**data)
        url = self._db_url or failure_url(self.settings.db_url, self.settings.mode)
        if self.pool is None and url and not isinstance(exc, DB_ERRORS):
            record_once(url, self.heartbeat_row())  # no pool yet: the row on a connection of its own
        self._close()
        return EXIT_FAILURE

    def _stopped_while_booting(self) -> int:
        """A stop requested while boot retried the database (a redeploy during an outage):
        nothing was taken, so it is a clean stop, exit 0, not a failed boot."""
        self.loop_done.set()
        self.stopping.enter_draining()
        self.lifecycle.finish(**self.stopping.shutdown_data(drained=True, exit_code=EXIT_OK))
        if self.pool is None and self.settings.db_url:
            record_once(self.settings.db_url, self.heartbeat_row())  # best effort: it may be down
        self._close()
        return EXIT_OK

    def _record_failure(self, data: dict[str, Any]) -> None:
        self.failure = kept_failure(data)

    # --- run -----------------------------------------------------------------------------

    def run(self) -> int:
        """Boot, process until stopped, and return the exit code."""
        try:
            self.facts = facts = self._boot()
        except Exception as exc:  # ConfigError, BootError, a database error, or any other
            if self.stop_requested.is_set() and isinstance(exc, DB_ERRORS):
                return self._stopped_while_booting()
            return self.boot_failed(exc)
        self.processor = make_processor(
            self.worker,
            facts,
            deliveries=self.deliveries,
            deadline=self.deadline,
            counters=self.counters,
            held=self.held,
        )
        self.consumer = Consumer(
            processor=self.processor, settings=self.settings, stopping=self.stop_requested
        )
        booted = self.lifecycle.booted(
            db_status="ok",
            notifications=facts.notifications,
            railway=dict(self.settings.railway),
            boot_s=self._uptime(),
            queue=self.queue,
            db_url=self.settings.safe_db_url or "embedded",
            previous=facts.previous,
        )
        if not booted and self.lifecycle.state is not State.DRAINING:
            return EXIT_FAILURE
        assert self.pool is not None
        self.housekeeper = Housekeeper(
            housekeeping_plan(self.settings, self.queue, self.worker_id),
            self.pool,
            beat=self.heartbeat.write,
            held=self.held,
            on_memory_exceeded=self.stopping.on_memory_exceeded,
            counters=self.counters,
        )
        self.housekeeper.start()
        self.deadline.start()
        try:
            self.consumer.run(self.pool, notifications=facts.notifications)
        except (Exception, MemoryError) as exc:
            return self._crash(exc)
        finally:
            self.loop_done.set()
            self.housekeeper.stop()
        return self.finish()

    def finish(self) -> int:
        """The loop ended: STOPPED (exit 0), or CRASHED when it was the memory limit's drain."""
        self.stopping.enter_draining()
        if self.stopping.memory is not None:
            self.lifecycle.crash(**self._memory_crash_data(drained=True))
            self._close()
            return EXIT_FAILURE
        if self.deliveries is not None and self._db_url is not None:
            self.deliveries.forget_quietly(_STATUS_WRITE_TIMEOUT_S)
        self.lifecycle.finish(**self.stopping.shutdown_data(drained=True, exit_code=EXIT_OK))
        self._close()
        return EXIT_OK

    def _crash_data(self, exc: BaseException, **extra: Any) -> dict[str, Any]:
        return crash_data(
            exc,
            state_before=self.lifecycle.state,
            counters=self.counters,
            job_keys=self.deadline.keys_in_hand(),
            **extra,
        )

    def _memory_crash_data(self, **extra: Any) -> dict[str, Any]:
        memory = self.stopping.memory
        assert memory is not None
        data = {**self._crash_data(memory_error(memory)), **memory.figures(), **extra}
        self._record_failure(data)
        return data

    def _on_hung_job(self, call: Call) -> None:
        """A handler past its deadline that did not give control back after the interrupt
        (a C call such as a socket read with no timeout): record the attempt on a connection
        of its own, then end the process, exit 1, for the platform to start a fresh one."""
        self.held.clear()  # its leases are no longer extended
        url = self._db_url
        if url is not None and self.processor is not None:
            self.processor.record_timeout(
                lambda: connect(url, f"{self.worker_id}:deadline"), call, interrupted=False
            )
        error = JobTimedOut(
            f"handler call of job {call.key} ran past its deadline of {call.deadline_s:g} s"
            f" (WORKER_JOB_TIMEOUT_S) and did not give control back"
        )
        data = self._crash_data(error, stack=call.stack)
        self._record_failure(data)
        self.lifecycle.crash(**data)
        self.heartbeat.flush(_STATUS_WRITE_TIMEOUT_S)
        logging.shutdown()
        os._exit(EXIT_FAILURE)

    def _crash(self, exc: BaseException) -> int:
        data = self._crash_data(exc)
        self._record_failure(data)
        self.lifecycle.crash(**data)
        self._close()
        return EXIT_FAILURE

    def _close(self) -> None:
        self.heartbeat.flush(_STATUS_WRITE_TIMEOUT_S)  # the last state's row, before the pool goes
        if self.deliveries is not None:
            self.deliveries.close()
        if self.pool is not None:
            self.pool.close(timeout=1.0)
        if self.consumer is not None:
            self.consumer.close()
