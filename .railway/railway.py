"""Railway configuration of the Dragonfly workers: one service per worker.

The Railway CLI (``railway config plan`` / ``railway config apply``) evaluates this
file with ``python3``: it loads it with ``importlib``, calls ``main()`` with no
argument, turns the returned project into a graph with ``to_graph()`` and reads
``PARTIAL``. See docs/RAILWAY_DEPLOY_NOTES.md.

Import nothing but ``railway_sdk`` and the standard library: the CLI's ``python3``
is not this project's virtualenv, so ``backend`` is not importable here. The worker
list and the drain timeout are repeated below, and
tests/unit/test_railway_config.py checks them against ``backend.config``.
"""

from __future__ import annotations

from typing import Any

from railway_sdk import create_railway_context, define_railway, github, project, service

# The workers repository does not own the whole Railway environment (the rest of
# Dragonfly lives there too), so it manages only what it declares: resources of
# other partials or of the dashboard are never planned for deletion. Never rename
# a partial after it has been applied.
PARTIAL = "workers"

PROJECT_NAME = "dragonfly"

# "<owner>/<repo>" of this repository. While None, the services carry no source and
# `railway config plan` shows the source the dashboard has; set it before the first
# apply so that a new environment builds from the repository.
GITHUB_REPO: str | None = None
GITHUB_BRANCH = "main"

# backend.config.WORKER_NAMES: `python -m backend.workers.<name>` consumes q_<name>.
WORKERS = ("collectability", "escalation", "outbox_processor")

# SIGTERM starts the worker's drain (WORKER_DRAIN_TIMEOUT_S); Railway sends SIGKILL
# DRAINING_SECONDS after SIGTERM (its default, 0, kills at once). The window must
# outlast the drain, with room for the rollback and the last heartbeat write.
DRAIN_TIMEOUT_S = 25
DRAINING_SECONDS = 40

# A crash, a boot failure or the memory soft limit exits 1: Railway restarts it.
# A drained stop exits 0 and is not restarted.
RESTART_MAX_RETRIES = 10

# Container limits. The worker reads its memory limit from the cgroup's memory.max,
# so the soft limit (WORKER_MEMORY_SOFT_LIMIT_PCT) follows this value.
CPU_VCPU = 0.5
MEMORY_BYTES = 512 * 1000 * 1000

# Nixpacks builds the image; its install phase comes from NIXPACKS_CONFIG (the locked
# production set, hashes required, into /opt/venv, on PATH at run time), never from
# `pip install .`, which would resolve unpinned versions on every deploy.
BUILDER = "NIXPACKS"
NIXPACKS_CONFIG = ".railway/nixpacks.toml"
PYTHON_VERSION = "3.11"

MIGRATE_COMMAND = "python -m backend.db.migrate"

# Destinations of the outbox processor; values live in the environment's shared
# variables, never in this file.
OUTBOX_VARIABLES = (
    "OUTBOX_WEBHOOK_URL",
    "OUTBOX_SLACK_WEBHOOK_URL",
    "OUTBOX_DISCORD_WEBHOOK_URL",
    "OUTBOX_SMTP_HOST",
    "OUTBOX_SMTP_PORT",
    "OUTBOX_SMTP_USERNAME",
    "OUTBOX_SMTP_PASSWORD",
    "OUTBOX_SMTP_FROM",
    "OUTBOX_SMTP_TLS",
    "OUTBOX_HTTP_TIMEOUT_S",
    "OUTBOX_SMTP_TIMEOUT_S",
)


def worker_variables(name: str, shared: Any) -> dict[str, Any]:
    """The environment of one worker; secrets are references to shared variables."""
    variables: dict[str, Any] = {
        "SUPABASE_MODE": "prod",
        # Use the Supabase session pooler URL: the direct host is IPv6-only.
        "SUPABASE_DB_URL": shared.SUPABASE_DB_URL,
        "WORKER_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        "WORKER_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        "RAILWAY_DEPLOYMENT_DRAINING_SECONDS": str(DRAINING_SECONDS),
        "NIXPACKS_PYTHON_VERSION": PYTHON_VERSION,
        # Install .railway/requirements.lock (hashes required), not `pip install .`.
        "NIXPACKS_CONFIG_FILE": NIXPACKS_CONFIG,
    }
    if name == "outbox_processor":
        variables.update({key: shared[key] for key in OUTBOX_VARIABLES})
    return variables


def worker_service(name: str, shared: Any) -> Any:
    """One worker: no healthcheck (it serves no HTTP), one replica, restart on failure."""
    return service(
        name,
        source=github(GITHUB_REPO, branch=GITHUB_BRANCH) if GITHUB_REPO else None,
        build={"builder": BUILDER},
        # Exec form, no shell: the Python process itself receives SIGTERM.
        start=f"python -m backend.workers.{name}",
        preDeploy=MIGRATE_COMMAND,
        replicas=1,
        deploy={
            "restartPolicyType": "ON_FAILURE",
            "restartPolicyMaxRetries": RESTART_MAX_RETRIES,
            "drainingSeconds": DRAINING_SECONDS,
            "sleepApplication": False,
            "limitOverride": {"containers": {"cpu": CPU_VCPU, "memoryBytes": MEMORY_BYTES}},
        },
        env=worker_variables(name, shared),
    )


@define_railway
def main(ctx: Any = None) -> Any:
    """The three worker services; the CLI calls this with no argument."""
    if DRAINING_SECONDS <= DRAIN_TIMEOUT_S:
        raise ValueError(
            f"DRAINING_SECONDS ({DRAINING_SECONDS}) must exceed DRAIN_TIMEOUT_S "
            f"({DRAIN_TIMEOUT_S}), or Railway kills workers in the middle of their drain"
        )
    if ctx is None:
        ctx = create_railway_context()
    return project(PROJECT_NAME, resources=[worker_service(name, ctx.shared) for name in WORKERS])
