"""What the runtime decides once, at boot: the worker's identity, the schema check, the
facts the database gives (``BootFacts``), the processor built from them, the housekeeping
plan."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from backend.config import QUEUES, Settings
from backend.db import ledger
from backend.db import queries as q
from backend.db.connect import boot_retrying, connect, permanent_reason
from backend.db.install import rls_hidden
from backend.db.migrate import (
    apply_migrations,
    current_version,
    latest_version,
    missing_for_workers,
    needed_version,
)
from backend.db.migration_lock import TIMEOUT_VARIABLE, LockWait
from backend.db.rollbacks import refuse_predating
from backend.db.upkeep import previous_instance
from backend.errors import BootError
from backend.workers.base import BaseWorker, ExternalWorker, TransactionalWorker
from backend.workers.crash_record import DeliveryLog
from backend.workers.deadline import Deadline
from backend.workers.external import ExternalProcessor
from backend.workers.held import Counters, HeldJobs
from backend.workers.housekeeping import HousekeepingPlan
from backend.workers.processor import Processor
from backend.workers.records import ProcessingOptions
from backend.workers.transactional import TransactionalProcessor

# The pool's first connection at boot, per boot attempt.
_BOOT_POOL_WAIT_S = 5.0


@dataclass(frozen=True, kw_only=True)
class BootFacts:
    """What boot learnt of the database, once: the processor is built from it."""

    notifications: bool  # LISTEN for inserts, or poll
    shared_keys: bool  # the ledger's key is the key alone (a schema before migration 0007)
    headers: bool  # the queue's table has pgmq's headers (1.5+): trace ids are read from them
    # Whether pg_stat_activity names this process's sessions by its worker id (not behind
    # the transaction pooler, and names passed through): what rescuing dead workers'
    # claims relies on, on both sides (``rescue.rescue_orphans``).
    sessions_named: bool
    previous: dict[str, Any] | None  # the last instance of this worker on this replica
    options: ProcessingOptions


def identity(worker: BaseWorker) -> dict[str, Any]:
    """The fields every lifecycle event carries (the guide's "Log events")."""
    s = worker.settings
    return {
        "worker_name": worker.queue,
        "worker_id": worker.worker_id,
        "version": s.version,
        "git_sha": s.git_sha,
        "mode": s.mode,
        "hostname": s.hostname,
        "pid": os.getpid(),
        "concurrency": 1,
    }


def processing_options(settings: Settings, *, rescue_orphans: bool = True) -> ProcessingOptions:
    """The processing tunables out of the settings."""
    return ProcessingOptions(
        batch_size=settings.batch_size,
        visibility_timeout_s=settings.visibility_timeout_s,
        max_attempts=settings.max_attempts,
        retry_base_s=settings.retry_base_s,
        retry_max_s=settings.retry_max_s,
        max_payload_bytes=settings.max_payload_bytes,
        rescue_orphans=rescue_orphans,
    )


def boot_database(
    url: str,
    worker: BaseWorker,
    *,
    replica: str,
    stopping: threading.Event,
    pool: Callable[[str], ConnectionPool[Any]],
) -> BootFacts:
    """Check the database on a connection of its own, then open the pool (``pool``) and
    learn the rest of the boot facts on its first connection; retried within
    ``WORKER_BOOT_TIMEOUT_S`` (the pool's first connection too: a database that goes away
    between the check and the pool, a restart, is waited for like one never there)."""
    settings, queue, worker_id = worker.settings, worker.queue, worker.worker_id
    try:
        for attempt in boot_retrying(settings.boot_timeout_s, stopping):
            with attempt:
                with connect(url, f"boot:{worker_id}") as conn:
                    notifications = check_schema(conn, settings, queue)
                    shared_keys = not ledger.keys_are_per_queue(conn)
                    headers = q.detect_headers(conn, queue)
                return boot_facts(
                    pool(url),
                    settings,
                    queue=queue,
                    worker_id=worker_id,
                    replica=replica,
                    notifications=notifications,
                    shared_keys=shared_keys,
                    headers=headers,
                )
    except psycopg.OperationalError as exc:
        if reason := permanent_reason(exc):
            raise BootError(reason) from None
        raise
    raise AssertionError("boot_retrying either returns or raises")


def boot_facts(
    pool: ConnectionPool[Any],
    settings: Settings,
    *,
    queue: str,
    worker_id: str,
    replica: str,
    notifications: bool,
    shared_keys: bool,
    headers: bool,
) -> BootFacts:
    """The boot facts, completed on the pool's first connection: the previous instance of
    this worker, and whether this process's sessions show under its worker id."""
    with pool.connection(timeout=_BOOT_POOL_WAIT_S) as conn:
        previous = previous_instance(conn, queue, worker_id, replica)
        named = not settings.uses_transaction_pooler and q.session_named(conn, worker_id)
    return BootFacts(
        notifications=notifications,
        shared_keys=shared_keys,
        headers=headers,
        sessions_named=named,
        previous=previous,
        options=processing_options(settings, rescue_orphans=named),
    )


def make_processor(
    worker: BaseWorker,
    facts: BootFacts,
    *,
    deliveries: DeliveryLog | None,
    deadline: Deadline,
    counters: Counters,
    held: HeldJobs,
) -> Processor:
    """The worker kind's processor, with the worker as its handler, built once from the
    boot facts; the counters and held jobs are the runtime's, which the processor fills."""
    common: dict[str, Any] = {
        "queue": worker.queue,
        "worker_id": worker.worker_id,
        "options": facts.options,
        "shared_keys": facts.shared_keys,
        "headers": facts.headers,
        "deadline": deadline,
        "counters": counters,
        "held": held,
    }
    if isinstance(worker, TransactionalWorker):
        assert deliveries is not None, "a transactional worker records its deliveries"
        return TransactionalProcessor(handler=worker, deliveries=deliveries, **common)
    if isinstance(worker, ExternalWorker):
        return ExternalProcessor(handler=worker, **common)
    check_kind(worker)  # raises
    raise AssertionError(type(worker))


def check_kind(worker: BaseWorker) -> None:
    """Refuse, before anything starts, a worker of neither kind."""
    if not isinstance(worker, TransactionalWorker | ExternalWorker):
        raise TypeError(f"{type(worker).__name__} must inherit from TransactionalWorker or ExternalWorker")


def check_schema(conn: psycopg.Connection[Any], settings: Settings, queue: str) -> bool:
    """Migrate (dev) or check the schema and the queue (prod); return whether insert
    notifications can be used. Either way, first refuse (``ReleaseTooOld``) a schema with a
    contract step this code predates, before anything is migrated or any message read.
    Refuse a queue whose rows row-level security hides from this role: it would read an
    empty queue forever."""
    refuse_predating(conn, latest_version())
    if settings.mode == "dev":
        queues = (*QUEUES, queue) if queue not in QUEUES else QUEUES
        apply_migrations(conn, queues=queues, lock_wait=boot_lock_wait(settings))
    else:
        missing = missing_for_workers(conn)
        if missing:
            raise BootError(
                f"workers schema is at version {current_version(conn)}, this worker needs"
                f" {needed_version()} (missing: {', '.join(map(str, missing))}):"
                " run `python -m backend.db.migrate`"
            )
        if not q.queue_exists(conn, queue):
            raise BootError(f"queue {queue} does not exist: run `python -m backend.db.migrate`")
    hidden = rls_hidden(conn, queue)
    if hidden:
        raise BootError(hidden)
    return (
        settings.notifications == "auto"
        and not settings.uses_transaction_pooler
        and q.notifications_available(conn, queue)
    )


def boot_lock_wait(settings: Settings) -> LockWait:
    """A dev worker's boot waits for the migrations' lock within its boot budget."""
    if settings.boot_timeout_s < settings.migration_lock_timeout_s:
        return LockWait(timeout_s=settings.boot_timeout_s, variable="WORKER_BOOT_TIMEOUT_S")
    return LockWait(timeout_s=settings.migration_lock_timeout_s, variable=TIMEOUT_VARIABLE)


def housekeeping_plan(settings: Settings, queue: str, worker_id: str) -> HousekeepingPlan:
    """What the housekeeping thread does, and how often, out of the settings."""
    s = settings
    return HousekeepingPlan(
        queue=queue,
        worker_id=worker_id,
        heartbeat_interval_s=s.heartbeat_interval_s,
        lease_s=s.visibility_timeout_s,
        memory_limit_bytes=s.memory_limit_bytes,
        memory_soft_pct=s.memory_soft_limit_pct,
        memory_check_interval_s=s.memory_check_interval_s,
        progress_interval_s=s.progress_interval_s,
        sample_interval_s=s.sample_interval_s,
        prune_interval_s=s.prune_interval_s,
        ledger_retention_days=s.ledger_retention_days,
        heartbeat_retention_days=s.heartbeat_retention_days,
    )
