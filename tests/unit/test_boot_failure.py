"""A boot failure is reported even when a signal arrived while booting."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.config import load_settings
from backend.db.embedded import PROJECT_ROOT
from backend.errors import BootError, ConfigError
from backend.workers.lifecycle import State
from backend.workers.runtime import Runtime
from tests.workers.probe import ProbeTransactional


def test_boot_failure_after_a_signal_during_boot_is_still_logged(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings({"SUPABASE_MODE": "dev", "WORKER_DRAIN_TIMEOUT_S": "600"})
    runtime = Runtime(ProbeTransactional(settings))
    with caplog.at_level(logging.INFO, logger="dragonfly.events"):
        runtime.stop("SIGTERM (Deployment/Scale-down)")
        assert runtime.lifecycle.state is State.DRAINING
        assert runtime.boot_failed(BootError("schema missing")) == 1
    events = [
        (r.event, r.data)
        for r in caplog.records  # type: ignore[attr-defined]
        if r.name == "dragonfly.events"
    ]
    names = [name for name, _ in events]
    assert names == ["WORKER_DRAINING", "WORKER_BOOT", "WORKER_CRASH"]
    boot = events[1][1]
    assert boot["db_status"] == "error" and boot["error"] == "schema missing"
    assert runtime.lifecycle.state is State.CRASHED
    runtime.loop_done.set()


def test_a_stop_that_races_the_end_of_boot_still_drains_and_shuts_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The signal thread has set the stop flag but not yet moved the machine to DRAINING
    # when the main thread finishes booting and then stopping.
    settings = load_settings({"SUPABASE_MODE": "dev"})
    runtime = Runtime(ProbeTransactional(settings))
    runtime.stopping.reason = "SIGTERM (Deployment/Scale-down)"
    runtime.stop_requested.set()
    with caplog.at_level(logging.INFO, logger="dragonfly.events"):
        assert runtime.lifecycle.booted(db_status="ok")
        assert runtime.finish() == 0
    names = [r.event for r in caplog.records if r.name == "dragonfly.events"]  # type: ignore[attr-defined]
    assert names == ["WORKER_BOOT", "WORKER_DRAINING", "WORKER_SHUTDOWN"]
    assert runtime.lifecycle.state is State.STOPPED


def test_a_lenient_load_replaces_bad_tunables_by_their_defaults_and_says_so() -> None:
    env = {"SUPABASE_MODE": "dev", "WORKER_BATCH_SIZE": "abc", "WORKER_LOG_LEVEL": "LOUD"}
    with pytest.raises(ConfigError, match="WORKER_BATCH_SIZE"):
        load_settings(env)
    settings = load_settings(env, lenient=True)
    assert settings.batch_size == 100 and settings.log_level == "INFO"
    assert [w.split(":")[0] for w in settings.warnings] == ["WORKER_BATCH_SIZE", "WORKER_LOG_LEVEL"]
    with pytest.raises(ConfigError, match="SUPABASE_MODE"):
        load_settings({**env, "SUPABASE_MODE": "staging"}, lenient=True)


def test_embedded_status_exits_3_when_the_server_is_not_running(tmp_path: Path) -> None:
    env = {**os.environ, "DRAGONFLY_DATA_DIR": str(tmp_path / "nothing-here")}
    done = subprocess.run(
        [sys.executable, "-m", "backend.db.embedded", "status"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3 and done.stdout.startswith("not running"), done.stdout + done.stderr
