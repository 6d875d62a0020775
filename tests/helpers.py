"""Small helpers of the tests: a probe job, one value from a query, a bounded poll, and
the environment of a test's worker (the process wrapper is ``scripts.harness.process``)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from backend.enqueue import build_envelope
from scripts.harness.process import ROOT, inherited_env, with_password

# Every test worker logs in with this password (the embedded server trusts local sockets
# anyway); no line a worker prints may carry it.
PASSWORD = "s3cret-Pw-do-not-print"


def worker_env(db_url: str | None, **extra: str) -> dict[str, str]:
    """A test worker's environment: dev mode, short intervals, the URL with ``PASSWORD``."""
    env = inherited_env(
        SUPABASE_MODE="dev",
        WORKER_HEARTBEAT_INTERVAL_S="0.2",
        WORKER_BOOT_TIMEOUT_S="5",
        PYTHONUNBUFFERED="1",
    )
    if db_url:
        env["SUPABASE_DB_URL"] = with_password(db_url, PASSWORD)
    env.update(extra)
    return env


def run_inspector(
    url: str, *args: str, timeout: float = 60, **settings: str
) -> subprocess.CompletedProcess[str]:
    """``python -m tools.worker_inspector ARGS`` against ``url`` (``settings``: more of its
    environment), its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "tools.worker_inspector", *args],
        cwd=ROOT,
        env=worker_env(url, **settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job(key: str, **payload: Any) -> dict[str, Any]:
    """A probe worker's job envelope (tests/workers/probe.py reads ``payload``)."""
    return build_envelope(
        entity_type="probe", entity_id=key, org_id="org-test", idempotency_key=key, payload=payload
    )


def one(db: Any, sql: str, *args: Any) -> Any:
    """The first column of the first row of ``sql`` (a dict-row connection), or None."""
    row = db.execute(sql, args).fetchone()
    return None if row is None else next(iter(row.values()))


def wait_until(check: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``check`` (a database query, say) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        time.sleep(interval)
