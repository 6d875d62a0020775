from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scripts.harness.process import WorkerProcess
from tests.helpers import PASSWORD, worker_env


@pytest.fixture
def spawn(clean_db: str) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes against the test database; all are killed after the test."""
    started: list[WorkerProcess] = []

    def start(
        module: str = "tests.workers.probe", *, db_url: str | None = clean_db, **env: Any
    ) -> WorkerProcess:
        proc = WorkerProcess(
            module,
            worker_env(db_url, **{k: str(v) for k, v in env.items()}),
            secrets=(PASSWORD,),
            strict=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
        proc.check_output()
