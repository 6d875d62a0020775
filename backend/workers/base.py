"""``BaseWorker``: boot, the run loop, draining, crashes and exit codes (SPEC 3, 6, 7).

A worker subclass names its queue and handler kind and implements ``handle``; the three
Dragonfly workers are such subclasses; ``backend.workers.entry.run_worker`` starts them.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
import traceback
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import psycopg
from psycopg_pool import ConnectionPool
from tenacity import RetryError

from backend.config import QUEUES, Settings, url_password
from backend.db import queries as q
from backend.db.connect import (
    DB_ERRORS,
    boot_retrying,
    connect,
    jittered,
    make_pool,
    outage_retrying,
    resolve_db_url,
)
from backend.db.migrate import apply_migrations, current_version, latest_version
from backend.errors import BootError, ConfigError
from backend.jobs import Job
from backend.logs import add_secret, log_event
from backend.workers.deliveries import DeliveryLog
from backend.workers.housekeeping import Housekeeper, HousekeepingPlan
from backend.workers.lifecycle import Lifecycle, State
from backend.workers.memory import MemoryVerdict, rss_bytes
from backend.workers.processing import (
    Counters,
    HandlerKind,
    HeldJobs,
    ProcessingOptions,
    Processor,
)
from backend.workers.signals import SignalWatcher

EXIT_OK, EXIT_FAILURE, EXIT_SIGNAL = 0, 1, 143
SIGNAL_REASONS = {signal.SIGTERM: "SIGTERM (Deployment/Scale-down)", signal.SIGINT: "SIGINT (Interrupt)"}
MEMORY_REASON = "memory soft limit"
# Short pool waits: during an outage every one of them delays a SIGTERM's exit.
_STATUS_WRITE_TIMEOUT_S = 1.0
_ACQUIRE_TIMEOUT_S = 2.0


class BaseWorker:
    """One process consuming one queue with one handler, one job at a time."""

    name: ClassVar[str]
    kind: ClassVar[HandlerKind]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue = f"q_{self.name}"
        self.worker_id = f"{self.name}-{settings.hostname}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started_at = datetime.now(UTC)
        self._started = time.monotonic()
        self.counters = Counters()
        self.held = HeldJobs()
        self.pool: ConnectionPool[Any] | None = None
        self.housekeeper: Housekeeper | None = None
        self.notifications = False
        self.stop_requested = threading.Event()
        self.loop_done = threading.Event()
        self.stop_reason = ""
        self.memory: MemoryVerdict | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self.lifecycle = Lifecycle(emit=self._emit, write_status=self._write_status)
        self._db_url: str | None = None
        self.deliveries = (
            DeliveryLog(queue_name=self.queue, worker_id=self.worker_id, open_conn=self._deliveries_conn)
            if self.kind == "transactional"
            else None
        )
        self.processor = Processor(
            queue=self.queue,
            worker_id=self.worker_id,
            kind=self.kind,
            handler=self,  # type: ignore[arg-type]
            deliveries=self.deliveries,
            options=ProcessingOptions(
                batch_size=settings.batch_size,
                visibility_timeout_s=settings.visibility_timeout_s,
                max_attempts=settings.max_attempts,
                retry_base_s=settings.retry_base_s,
                retry_max_s=settings.retry_max_s,
                max_payload_bytes=settings.max_payload_bytes,
            ),
            counters=self.counters,
            held=self.held,
        )

    def _deliveries_conn(self) -> psycopg.Connection[Any]:
        assert self._db_url is not None, "deliveries are recorded only after boot"
        return connect(self._db_url, f"{self.worker_id}:deliveries")

    # --- hooks for subclasses ------------------------------------------------------------

    def setup(self) -> None:
        """Validate the worker's own configuration at boot; raise ``ConfigError``."""

    # --- identity and events -----------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        s = self.settings
        return {
            "worker_name": self.queue,
            "worker_id": self.worker_id,
            "version": s.version,
            "git_sha": s.git_sha,
            "mode": s.mode,
            "hostname": s.hostname,
            "pid": os.getpid(),
            "concurrency": 1,
        }

    def _emit(self, event: str, data: Any, level: int) -> None:
        log_event(event, {**self.identity(), **data}, level)

    def heartbeat_row(self) -> dict[str, Any]:
        s = self.settings
        rss = self.housekeeper.last_rss if self.housekeeper and self.housekeeper.last_rss else rss_bytes()
        return {
            "worker_id": self.worker_id,
            "worker_name": self.queue,
            "queue_name": self.queue,
            "status": self.lifecycle.state.value,
            "hostname": s.hostname,
            "pid": os.getpid(),
            "version": s.version,
            "git_sha": s.git_sha,
            "started_at": self.started_at,
            "jobs_processed": self.counters.processed,
            "jobs_failed": self.counters.failed,
            "rss_bytes": rss,
            "metadata": dict(s.railway),
        }

    def _write_status(self, state: State) -> None:
        """Every transition writes the heartbeat row at once; best effort on the way down."""
        if self.pool is None:
            return
        try:
            with self.pool.connection(timeout=_STATUS_WRITE_TIMEOUT_S) as conn:
                q.upsert_heartbeat(conn, self.heartbeat_row())
        except psycopg.Error as exc:
            log_event(
                "HEARTBEAT_FAILED",
                {
                    "worker_id": self.worker_id,
                    "status": state.value,
                    "error": " ".join(str(exc).split()),
                    "error_type": type(exc).__name__,
                },
                logging.WARNING,
            )

    def _uptime(self) -> float:
        return round(time.monotonic() - self._started, 3)

    def _shutdown_data(self, *, drained: bool, exit_code: int) -> dict[str, Any]:
        return {
            "reason": self.stop_reason,
            "drained": drained,
            "uptime_s": self._uptime(),
            "jobs_processed": self.counters.processed,
            "jobs_failed": self.counters.failed,
            "exit_code": exit_code,
        }

    # --- signals and stopping ------------------------------------------------------------

    def on_signal(self, sig: signal.Signals, count: int) -> None:
        """First SIGTERM/SIGINT drains; a second one abandons in-flight work (exit 143)."""
        if count == 1:
            # Already draining (the memory soft limit): the first signal changes nothing.
            self.request_stop(SIGNAL_REASONS.get(sig, sig.name))
        else:
            self.abandon(f"second signal ({sig.name}) while draining")

    def request_stop(self, reason: str) -> None:
        """Drain: finish the in-flight batch, then stop; abandon past the drain timeout."""
        if self.stop_requested.is_set():
            return
        self.stop_reason = reason
        in_flight = self.processor.in_flight
        # Stop and arm the deadline first: the transition writes the heartbeat, which can
        # hang on a dead network, and a second signal must still be able to abandon.
        self.stop_requested.set()
        self._wake()
        threading.Thread(target=self._drain_deadline, name="drain-deadline", daemon=True).start()
        self._enter_draining(in_flight)

    def _enter_draining(self, in_flight: int | None = None) -> None:
        """Move to DRAINING if not there yet. Called by the stopping thread and, in case it
        has not got that far, by the main thread before it finishes: whichever is first
        emits WORKER_DRAINING, the other's trigger is refused."""
        if self.lifecycle.state in (State.BOOTING, State.RUNNING):
            self.lifecycle.drain(
                reason=self.stop_reason,
                in_flight=self.processor.in_flight if in_flight is None else in_flight,
                drain_timeout_s=self.settings.drain_timeout_s,
            )

    def _drain_deadline(self) -> None:
        if not self.loop_done.wait(self.settings.drain_timeout_s):
            self.abandon(f"drain timeout ({self.settings.drain_timeout_s:g} s)")

    def abandon(self, why: str) -> None:
        """Stop now: the open transaction dies with the process and rolls back.

        A memory drain that cannot finish still ends as the memory crash it is (exit 1)."""
        self.stop_reason = self.stop_reason or why
        self._enter_draining()
        if self.memory is not None:
            changed = self.lifecycle.crash(**self._memory_crash_data(drained=False, abandoned=why))
            code = EXIT_FAILURE
        else:
            changed = self.lifecycle.abandon(
                **self._shutdown_data(drained=False, exit_code=EXIT_SIGNAL),
                abandoned=why,
                in_flight=self.processor.in_flight,
            )
            code = EXIT_SIGNAL
        if not changed:
            return
        self._release_held()
        logging.shutdown()
        os._exit(code)

    def _release_held(self) -> None:
        """Give back what the abandoned work held, so other workers need not wait out the
        leases; bounded, since the abandoned transaction may still lock some of it."""
        msg_ids, keys = self.held.snapshot()
        if self.pool is None or not (msg_ids or keys):
            return
        try:
            with self.pool.connection(timeout=1) as conn, conn.transaction():
                q.bound_transaction(conn, 1000)
                q.set_visibility(conn, self.queue, msg_ids, [0] * len(msg_ids))
                q.release_claims(conn, self.worker_id, keys)
        except psycopg.Error as exc:
            log_event(
                "RELEASE_FAILED",
                {
                    "worker_id": self.worker_id,
                    "messages": len(msg_ids),
                    "claims": len(keys),
                    "error": " ".join(str(exc).split()),
                    "error_type": type(exc).__name__,
                    "consequence": "they return when their leases end",
                },
                logging.WARNING,
            )

    def _on_memory_exceeded(self, verdict: MemoryVerdict) -> None:
        # Already stopping for a signal: that drain ends the process anyway (exit 0).
        if self.memory is None and not self.stop_requested.is_set():
            self.memory = verdict
            log_event(
                "WORKER_MEMORY_SOFT_LIMIT",
                {"worker_id": self.worker_id, **verdict.figures()},
                logging.WARNING,
            )
            self.request_stop(MEMORY_REASON)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # --- boot ----------------------------------------------------------------------------

    def _boot(self) -> None:
        self.setup()
        url = resolve_db_url(self.settings)
        add_secret(url_password(url))
        for attempt in boot_retrying(self.settings.boot_timeout_s, self.stop_requested):
            with attempt, connect(url, f"boot:{self.worker_id}") as conn:
                self._check_schema(conn)
        self._db_url = url
        self.pool = make_pool(url, self.worker_id)
        self.pool.open(wait=True, timeout=max(2.0, self.settings.boot_timeout_s))

    def _check_schema(self, conn: psycopg.Connection[Any]) -> None:
        if self.settings.mode == "dev":
            apply_migrations(conn, queues=(*QUEUES, self.queue) if self.queue not in QUEUES else QUEUES)
        else:
            current, latest = current_version(conn), latest_version()
            if current < latest:
                raise BootError(
                    f"workers schema is at version {current}, this worker needs {latest}:"
                    " run `python -m backend.db.migrate`"
                )
            if not q.queue_exists(conn, self.queue):
                raise BootError(f"queue {self.queue} does not exist: run `python -m backend.db.migrate`")
        self.notifications = (
            self.settings.notifications == "auto"
            and not self.settings.uses_transaction_pooler
            and q.notifications_available(conn, self.queue)
        )

    def _boot_failed(self, exc: BaseException) -> int:
        data = {"db_status": "error", **self._crash_data(exc)}
        if not self.lifecycle.boot_failed(**data):
            # A signal arrived while booting (DRAINING): the failure is still reported.
            self._emit(
                "WORKER_BOOT",
                {
                    "from": self.lifecycle.state.value,
                    "to": State.CRASHED.value,
                    "trigger": "boot_failed",
                    **data,
                },
                logging.ERROR,
            )
            self.lifecycle.crash(**data)
        self._close()
        return EXIT_FAILURE

    # --- run -----------------------------------------------------------------------------

    def run(self) -> int:
        """Boot, process until stopped, and return the exit code."""
        SignalWatcher(self.on_signal).install()
        try:
            self._boot()
        except (ConfigError, BootError, *DB_ERRORS, OSError) as exc:  # type: ignore[misc]
            return self._boot_failed(exc)
        except Exception as exc:
            return self._boot_failed(exc)
        booted = self.lifecycle.booted(
            db_status="ok",
            notifications=self.notifications,
            railway=dict(self.settings.railway),
            boot_s=self._uptime(),
            queue=self.queue,
            db_url=self.settings.safe_db_url or "embedded",
        )
        if not booted and self.lifecycle.state is not State.DRAINING:
            return EXIT_FAILURE
        assert self.pool is not None
        self.housekeeper = Housekeeper(
            self._housekeeping_plan(),
            self.pool,
            heartbeat_row=self.heartbeat_row,
            held=self.held,
            on_memory_exceeded=self._on_memory_exceeded,
        )
        self.housekeeper.start()
        try:
            self._loop()
        except (Exception, MemoryError) as exc:
            return self._crash(exc)
        finally:
            self.loop_done.set()
            self.housekeeper.stop()
        return self._stop()

    def _stop(self) -> int:
        self._enter_draining()
        if self.memory is not None:
            self.lifecycle.crash(**self._memory_crash_data(drained=True))
            self._close()
            return EXIT_FAILURE
        self._forget_deliveries()
        self.lifecycle.finish(**self._shutdown_data(drained=True, exit_code=EXIT_OK))
        self._close()
        return EXIT_OK

    def _forget_deliveries(self) -> None:
        """A clean stop: the last batch ended with an outcome, so its record goes (best
        effort: a record left behind only makes its retries run alone)."""
        if self.deliveries is None or self._db_url is None:
            return
        try:
            self.deliveries.forget(_STATUS_WRITE_TIMEOUT_S)
        except (psycopg.Error, OSError):
            pass

    def _crash_data(self, exc: BaseException, **extra: Any) -> dict[str, Any]:
        return {
            "error": " ".join(str(exc).split()) or type(exc).__name__,
            "error_type": type(exc).__name__,
            "traceback": _tb(exc),
            "state_before": self.lifecycle.state.value,
            "exit_code": EXIT_FAILURE,
            "jobs_processed": self.counters.processed,
            "jobs_failed": self.counters.failed,
            **extra,
        }

    def _memory_crash_data(self, **extra: Any) -> dict[str, Any]:
        assert self.memory is not None
        error = MemoryError(
            f"RSS {self.memory.figures()['rss_mb']} MB above the soft limit of"
            f" {self.memory.figures()['soft_limit_mb']} MB"
        )
        return {**self._crash_data(error), **self.memory.figures(), **extra}

    def _crash(self, exc: BaseException) -> int:
        self.lifecycle.crash(**self._crash_data(exc))
        self._close()
        return EXIT_FAILURE

    def _close(self) -> None:
        if self.deliveries is not None:
            self.deliveries.close()
        if self.pool is not None:
            self.pool.close(timeout=1.0)
        self._wake_r.close()
        self._wake_w.close()

    def _housekeeping_plan(self) -> HousekeepingPlan:
        s = self.settings
        return HousekeepingPlan(
            queue=self.queue,
            worker_id=self.worker_id,
            heartbeat_interval_s=s.heartbeat_interval_s,
            lease_s=s.visibility_timeout_s,
            memory_limit_bytes=s.memory_limit_bytes,
            memory_soft_pct=s.memory_soft_limit_pct,
            memory_check_interval_s=s.memory_check_interval_s,
            prune_interval_s=s.prune_interval_s,
            ledger_retention_days=s.ledger_retention_days,
            heartbeat_retention_days=s.heartbeat_retention_days,
        )

    def _loop(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        outage_since: float | None = None
        failures = 0
        while not self.stop_requested.is_set():
            try:
                if conn is None:
                    conn = self._acquire()
                read = self.processor.process_batch(conn, self.stop_requested.is_set)
                if outage_since is not None:
                    log_event(
                        "DB_RECOVERED",
                        {"worker_id": self.worker_id, "outage_s": round(time.monotonic() - outage_since, 3)},
                    )
                    outage_since = None
                if read == 0:
                    self._wait_for_work(conn)
                elif self.notifications:
                    self._forget_notifications(conn)
            except psycopg.Error as exc:
                if not isinstance(exc, DB_ERRORS) and not (conn is not None and conn.broken):
                    raise
                if _ended_by_bound(exc):
                    self._log_bound_exceeded(exc)
                    self._discard(conn)
                    conn = None
                    continue
                if outage_since is None:
                    outage_since = time.monotonic()
                    failures = 0
                    log_event(
                        "DB_OUTAGE",
                        {
                            "worker_id": self.worker_id,
                            "error": " ".join(str(exc).split()),
                            "error_type": type(exc).__name__,
                        },
                        logging.ERROR,
                    )
                else:
                    # It answered again but failed again: keep backing off, never spin.
                    failures += 1
                    self._back_off(failures, exc)
                self._discard(conn)
                conn = self._reconnect()
        self._discard(conn)

    def _log_bound_exceeded(self, exc: psycopg.Error) -> None:
        """The server ended this worker's transaction: it paused (a frozen process, a cut
        network, a handler busy outside the database) or ran one statement longer than the
        visibility timeout. Its locks went with it; its messages were delivered again."""
        log_event(
            "TRANSACTION_TIMED_OUT",
            {
                "worker_id": self.worker_id,
                "queue": self.queue,
                "error": " ".join(str(exc).split()),
                "error_type": type(exc).__name__,
                "limit_s": self.settings.visibility_timeout_s,
                "consequence": "rolled back; the jobs are delivered again, each run counted",
                "fix": "if a handler needs longer, raise WORKER_VISIBILITY_TIMEOUT_S",
            },
            logging.ERROR,
        )

    def _back_off(self, failures: int, exc: BaseException) -> None:
        delay = jittered(min(10.0, 0.25 * 2 ** min(failures, 6)))
        log_event(
            "DB_RETRY",
            {
                "attempt": failures,
                "delay_s": round(delay, 3),
                "error": " ".join(str(exc).split()),
                "error_type": type(exc).__name__,
            },
            logging.WARNING,
        )
        self.stop_requested.wait(delay)

    def _acquire(self) -> psycopg.Connection[Any]:
        """A pooled connection for the loop, listening when notifications are on, and
        known to answer; on any failure it goes back to the pool (which drops it if broken)."""
        assert self.pool is not None
        conn: psycopg.Connection[Any] = self.pool.getconn(timeout=_ACQUIRE_TIMEOUT_S)
        try:
            if self.notifications:
                conn.execute(f'LISTEN "{q.notify_channel(self.queue)}"')
            if q.read_only(conn):
                raise psycopg.errors.ReadOnlySqlTransaction(
                    "the database is read-only (a failover to a standby, or a full disk)"
                )
        except BaseException:
            self.pool.putconn(conn)
            raise
        return conn

    def _discard(self, conn: psycopg.Connection[Any] | None) -> None:
        """Give the loop's connection back to the pool, whatever state it is in."""
        if conn is None or self.pool is None:
            return
        try:
            if self.notifications and not conn.broken and not conn.closed:
                conn.execute("UNLISTEN *")
        except psycopg.Error:
            pass
        finally:
            self.pool.putconn(conn)

    def _reconnect(self) -> psycopg.Connection[Any] | None:
        """Retry until the database answers, or return None when asked to stop."""
        try:
            for attempt in outage_retrying(self.stop_requested):
                with attempt:
                    return self._acquire()
        except (RetryError, *DB_ERRORS):  # type: ignore[misc]
            pass
        return None

    @staticmethod
    def _forget_notifications(conn: psycopg.Connection[Any]) -> None:
        """While busy, notifications pile up unread; the queue is read anyway."""
        for _ in conn.notifies(timeout=0):
            pass

    def _wait_for_work(self, conn: psycopg.Connection[Any]) -> None:
        """Idle until a message may be visible: notified, or seen by a one-statement check.

        The check costs one statement per poll (or per ``notify_wait_s`` with notifications)
        instead of the three of an empty batch transaction; it also catches retries whose
        delay ends, which no insert notification announces.
        """
        while not self.stop_requested.is_set():
            if self._idle(conn) or q.has_visible(conn, self.queue):
                return

    def _idle(self, conn: psycopg.Connection[Any]) -> bool:
        """Wait for an insert notification (True), the poll interval or a stop (False)."""
        if not self.notifications:
            self.stop_requested.wait(self.settings.poll_interval_s)
            return False
        if any(True for _ in conn.notifies(timeout=0)):
            return True
        wake = self._wake_r.fileno()
        ready, _, _ = select.select([conn.fileno(), wake], [], [], self.settings.notify_wait_s)
        if wake in ready:
            self._wake_r.recv(64)
            return False
        return conn.fileno() in ready and any(True for _ in conn.notifies(timeout=0))


# idle_in_transaction_session_timeout and statement_timeout: the bounds every transaction
# of the runtime sets (queries.bound_transaction).
_BOUND_SQLSTATES = frozenset({"25P03", "57014"})


def _ended_by_bound(exc: psycopg.Error) -> bool:
    return exc.sqlstate in _BOUND_SQLSTATES


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-8000:]


class TransactionalWorker(BaseWorker):
    """A worker whose effects are database writes, made in the claim's transaction."""

    kind: ClassVar[HandlerKind] = "transactional"

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None:
        raise NotImplementedError

    def handle_batch(self, conn: psycopg.Connection[Any], jobs: list[Job]) -> None:
        """Override with set-based SQL where it pays; by default, one job after another."""
        for job in jobs:
            self.handle(conn, job)


class ExternalWorker(BaseWorker):
    """A worker whose effects are outside the database; receivers dedupe by job key."""

    kind: ClassVar[HandlerKind] = "external"

    def handle(self, job: Job) -> None:
        raise NotImplementedError
