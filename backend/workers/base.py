"""The worker classes: what a worker is (a name, a kind, its handler, its setup). How it
runs is the ``Runtime``'s (``backend.workers.runtime``); ``backend.workers.entry.run_worker``
starts one as a process.

A worker inherits from ``TransactionalWorker`` (effects in the database, in the claim's
transaction) or ``ExternalWorker`` (effects outside it, deduplicated by the receiver).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import psycopg

from backend.config import Settings
from backend.jobs import Job

HandlerKind = Literal["transactional", "external"]


class BaseWorker:
    """One process consuming one queue (``q_<name>``) with one handler, one job at a time."""

    name: ClassVar[str]
    kind: ClassVar[HandlerKind]
    # This worker's own defaults of some WORKER_* tunables (variable -> value): what it
    # runs with when the environment does not set them.
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue = f"q_{self.name}"
        self.worker_id = f"{self.name}-{settings.hostname}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def setup(self) -> None:
        """Validate the worker's own configuration at boot; raise ``ConfigError``."""


class TransactionalWorker(BaseWorker):
    """A worker whose effects are database writes, made in the claim's transaction."""

    kind: ClassVar[HandlerKind] = "transactional"
    # A batch's handler call runs inside a transaction the server ends after the visibility
    # timeout (30 s by default): its deadline comes well before that.
    defaults: ClassVar[Mapping[str, Any]] = {"WORKER_JOB_TIMEOUT_S": 20.0}

    def handle(self, conn: psycopg.Connection[Any], job: Job) -> None:
        raise NotImplementedError

    def handle_batch(self, conn: psycopg.Connection[Any], jobs: list[Job]) -> None:
        """Override with set-based SQL where it pays; by default, one job after another."""
        for job in jobs:
            self.handle(conn, job)


class ExternalWorker(BaseWorker):
    """A worker whose effects are outside the database; receivers dedupe by job key.

    It may also define ``check(conn, job)``: database checks run after the claim and before
    ``handle``, in a short transaction of their own (a tenant check, say); raising
    ``PermanentJobError`` there dead-letters the job unsent."""

    kind: ClassVar[HandlerKind] = "external"

    def handle(self, job: Job) -> None:
        raise NotImplementedError
