"""Worker configuration, read from the environment once, at boot.

Every tunable is listed in ``TUNABLES`` (``backend/tunables.py``) with its default;
``docs/RAILWAY_WORKER_CONFIG.md`` documents the same list and a test keeps the two in step.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from backend import __version__
from backend.dburl import check_db_url, is_transaction_pooler, redact_url
from backend.errors import ConfigError

# The table lives in its own module; these names are imported from here too.
from backend.tunables import DEFAULT_DRAIN_TIMEOUT_S as DEFAULT_DRAIN_TIMEOUT_S
from backend.tunables import DEFAULTS as DEFAULTS
from backend.tunables import TUNABLES as TUNABLES
from backend.tunables import Tunable as Tunable

Mode = Literal["dev", "prod"]
# Through the transaction pooler a session advisory lock neither serialises the migrations
# nor ends with its process (it stays on a pooled server connection).
SESSION_NEEDED = (
    "migrations need a session connection (a session advisory lock, DDL): use the session pooler"
    " (port 5432) or the direct host, not the transaction pooler (port 6543, pgbouncer=true)"
)

RAILWAY_VARIABLES = (
    "RAILWAY_GIT_COMMIT_SHA",
    "RAILWAY_SERVICE_NAME",
    "RAILWAY_REPLICA_ID",
    "RAILWAY_DEPLOYMENT_ID",
    "RAILWAY_SERVICE_ID",
    "RAILWAY_ENVIRONMENT_NAME",
    "RAILWAY_PROJECT_ID",
)
_TUNABLE_FIELDS = {t.variable: t.variable.removeprefix("WORKER_").lower() for t in TUNABLES}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated worker settings; built by ``load_settings`` from the environment."""

    mode: Mode
    db_url: str | None
    version: str
    git_sha: str | None
    hostname: str
    railway: Mapping[str, str] = field(default_factory=dict)
    # The tunables: always given by load_settings, their defaults live in TUNABLES only.
    heartbeat_interval_s: float
    visibility_timeout_s: int
    batch_size: int
    max_attempts: int
    retry_base_s: float
    retry_max_s: float
    job_timeout_s: float
    drain_timeout_s: float
    boot_timeout_s: float
    migration_lock_timeout_s: float
    poll_interval_s: float
    notify_wait_s: float
    notifications: str
    memory_limit_mb: float | None
    memory_soft_limit_pct: float
    memory_check_interval_s: float
    progress_interval_s: float
    sample_interval_s: float
    max_payload_bytes: int
    ledger_retention_days: float
    heartbeat_retention_days: float
    prune_interval_s: float
    log_level: str
    log_format: str
    # Bad tunables a lenient load (the diagnostic commands) replaced by their defaults.
    warnings: tuple[str, ...] = ()

    @property
    def memory_limit_bytes(self) -> int | None:
        if self.memory_limit_mb is not None:
            return int(self.memory_limit_mb * 1024 * 1024)
        return cgroup_memory_max()

    @property
    def safe_db_url(self) -> str | None:
        return redact_url(self.db_url) if self.db_url else None

    @property
    def uses_transaction_pooler(self) -> bool:
        return bool(self.db_url) and is_transaction_pooler(self.db_url or "")


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    lenient: bool = False,
    defaults: Mapping[str, Any] | None = None,
    url_variable: str = "SUPABASE_DB_URL",
) -> Settings:
    """Read and validate the environment; raise ``ConfigError`` naming the variable.

    ``lenient`` (the inspector, migrate, enqueue: commands an operator needs most when
    something is misconfigured) replaces a bad ``WORKER_*`` tunable by its default and says
    so in ``Settings.warnings``; the mode and the database URL stay strict. ``defaults``
    replaces some tunables' defaults (a worker's own, ``BaseWorker.defaults``). ``url_variable``
    names the variable of the database URL (migrate's own, ``SUPABASE_MIGRATION_DB_URL``).
    A strict load (a worker's) in dev mode refuses the transaction pooler, before anything
    connects: such a worker applies the migrations at boot."""
    env = os.environ if environ is None else environ
    db_url = env.get(url_variable) or None
    mode = _mode(env, db_url)
    if mode == "prod" and not db_url:
        raise ConfigError(
            "SUPABASE_DB_URL", "required when SUPABASE_MODE=prod; set it to the Supabase session pooler URL"
        )
    if db_url:
        try:
            db_url = check_db_url(db_url, prod=mode == "prod")
        except ConfigError as exc:
            raise ConfigError(url_variable, str(exc).partition(": ")[2]) from None
        if mode == "dev" and not lenient and is_transaction_pooler(db_url):
            raise ConfigError(
                url_variable, f"a worker in dev mode applies the migrations at boot; {SESSION_NEEDED}"
            )
    warnings: list[str] = []
    values: dict[str, Any] = {}
    for tunable in TUNABLES:
        if defaults and tunable.variable in defaults:
            tunable = replace(tunable, default=defaults[tunable.variable])
        try:
            values[_TUNABLE_FIELDS[tunable.variable]] = _tunable(env, tunable)
            _check_tunable(tunable.variable, values)
        except ConfigError as exc:
            if not lenient:
                raise
            warnings.append(f"{exc}; ignored, using the default {tunable.default!r}")
            values[_TUNABLE_FIELDS[tunable.variable]] = tunable.default
    values["log_level"] = str(values["log_level"]).upper()
    values["warnings"] = tuple(warnings)
    railway = {name: env[name] for name in RAILWAY_VARIABLES if env.get(name)}
    return Settings(
        mode=mode,
        db_url=db_url,
        version=env.get("WORKER_VERSION") or __version__,
        git_sha=env.get("RAILWAY_GIT_COMMIT_SHA") or None,
        hostname=socket.gethostname(),
        railway=railway,
        **values,
    )


def _check_tunable(variable: str, values: Mapping[str, Any]) -> None:
    """The rules a tunable's value must follow beyond its type and minimum."""
    if variable == "WORKER_LOG_LEVEL" and str(values["log_level"]).upper() not in {
        "DEBUG",
        "INFO",
        "WARNING",
        "ERROR",
    }:
        raise ConfigError(
            variable, f"unknown level {values['log_level']!r}; use DEBUG, INFO, WARNING or ERROR"
        )
    if variable == "WORKER_LOG_FORMAT" and values["log_format"] not in {"auto", "json", "console"}:
        raise ConfigError(variable, f"unknown format {values['log_format']!r}; use auto, json or console")
    if variable == "WORKER_NOTIFICATIONS" and values["notifications"] not in {"auto", "off"}:
        raise ConfigError(variable, "use auto or off")
    if variable == "WORKER_RETRY_MAX_S" and values["retry_max_s"] < values["retry_base_s"]:
        raise ConfigError(variable, "must be at least WORKER_RETRY_BASE_S")


def _mode(env: Mapping[str, str], db_url: str | None) -> Mode:
    raw = env.get("SUPABASE_MODE", "").strip().lower()
    if raw in ("dev", "prod"):
        return raw  # type: ignore[return-value]
    if raw:
        raise ConfigError("SUPABASE_MODE", f"unknown mode {raw!r}; use dev or prod")
    on_railway = any(k.startswith("RAILWAY_") and k.endswith("_ID") for k in env)
    if db_url or on_railway:
        raise ConfigError(
            "SUPABASE_MODE", "required when SUPABASE_DB_URL is set or on Railway; set it to dev or prod"
        )
    return "dev"


def _tunable(env: Mapping[str, str], tunable: Tunable) -> Any:
    raw = env.get(tunable.variable)
    if raw is None or raw.strip() == "":
        return tunable.default
    try:
        value = tunable.parse(raw.strip())
    except ValueError:
        kind = "a whole number" if tunable.parse is int else "a number"
        raise ConfigError(tunable.variable, f"{raw!r} is not {kind}") from None
    if tunable.minimum is not None and value < tunable.minimum:
        raise ConfigError(tunable.variable, f"{raw!r} is below the minimum {tunable.minimum:g}")
    return value


def cgroup_memory_max(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup v2 (or v1) memory limit of this process, or None when unlimited."""
    for candidate in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= 1 << 60 else value
    return None


# The workers and their queues (docs/RAILWAY_WORKER_CONFIG.md, "Start commands"):
# python -m backend.workers.<name> consumes q_<name>.
WORKER_NAMES = ("collectability", "escalation", "outbox_processor")
QUEUES = tuple(f"q_{name}" for name in WORKER_NAMES)
# The entity a job of each queue names (``entity_type``); another one is dead-lettered.
ENTITY_TYPES: Mapping[str, str] = {
    "q_collectability": "judgment",
    "q_escalation": "enforcement_case",
    "q_outbox_processor": "notification",
}
