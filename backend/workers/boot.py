"""What the runtime decides once, at boot: the worker's identity, its strategy, the schema
check, the housekeeping plan."""

from __future__ import annotations

import os
from typing import Any

import psycopg

from backend.config import QUEUES, Settings
from backend.db import queries as q
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
from backend.errors import BootError
from backend.workers.base import BaseWorker, ExternalWorker, TransactionalWorker
from backend.workers.deadline import Deadline
from backend.workers.deliveries import DeliveryLog
from backend.workers.delivery import ProcessingOptions
from backend.workers.external import ExternalStrategy
from backend.workers.housekeeping import HousekeepingPlan
from backend.workers.strategy import Strategy
from backend.workers.transactional import TransactionalStrategy


def identity(worker: BaseWorker) -> dict[str, Any]:
    """The fields every lifecycle event carries (SPEC 3)."""
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


def processing_options(settings: Settings) -> ProcessingOptions:
    """The processing tunables out of the settings."""
    return ProcessingOptions(
        batch_size=settings.batch_size,
        visibility_timeout_s=settings.visibility_timeout_s,
        max_attempts=settings.max_attempts,
        retry_base_s=settings.retry_base_s,
        retry_max_s=settings.retry_max_s,
        max_payload_bytes=settings.max_payload_bytes,
    )


def make_strategy(worker: BaseWorker, deliveries: DeliveryLog | None, deadline: Deadline) -> Strategy:
    """The worker kind's strategy, with the worker as its handler."""
    common: dict[str, Any] = {
        "queue": worker.queue,
        "worker_id": worker.worker_id,
        "options": processing_options(worker.settings),
        "deadline": deadline,
    }
    if isinstance(worker, TransactionalWorker):
        assert deliveries is not None, "a transactional worker records its deliveries"
        return TransactionalStrategy(handler=worker, deliveries=deliveries, **common)
    if isinstance(worker, ExternalWorker):
        return ExternalStrategy(handler=worker, **common)
    raise TypeError(f"{type(worker).__name__} must inherit from TransactionalWorker or ExternalWorker")


def check_schema(conn: psycopg.Connection[Any], settings: Settings, queue: str) -> bool:
    """Migrate (dev) or check the schema and the queue (prod); return whether insert
    notifications can be used. Either way, first refuse (``ReleaseTooOld``) a schema with a
    contract step this code predates, before anything is migrated or any message read.
    Refuse a queue whose rows row-level security hides from this role: it would read an
    empty queue forever. Whether the queue's messages carry pgmq headers is decided here too."""
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
    q.detect_headers(conn, queue)
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
