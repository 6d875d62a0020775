"""How the bench starts a worker (as Railway would: prod mode and the URL) and waits for it
to finish a queue."""

from __future__ import annotations

import time

from scripts.bench.database import BenchDatabase
from scripts.harness.process import WorkerProcess, inherited_env


def worker_env(url: str, **settings: str) -> dict[str, str]:
    """The environment of a worker on Railway: prod mode, the URL, the given settings."""
    return inherited_env(SUPABASE_MODE="prod", SUPABASE_DB_URL=url, **settings)


def wait_processed(
    db: BenchDatabase, worker: WorkerProcess, worker_id: str, total: int, timeout: float
) -> None:
    """Wait until the worker's heartbeat row counts ``total`` jobs done."""
    deadline = time.monotonic() + timeout
    while db.processed(worker_id) < total:
        if worker.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {worker.proc.returncode} before finishing;"
                " last output:\n" + worker.tail(20)
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"worker processed {db.processed(worker_id)} of {total} jobs within {timeout:g} s"
            )
        time.sleep(0.05)
