"""The Railway configuration (.railway/railway.py), evaluated the way the Railway CLI
evaluates it, checked against the deployment checklist of SPEC 9."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import railway_sdk

from backend.config import DEFAULT_DRAIN_TIMEOUT_S, WORKER_NAMES
from backend.domain import outbox

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / ".railway" / "railway.py"

# What `railway config plan/apply` does with a .py file: run python3 with a short
# program that loads the file with importlib, takes PARTIAL, calls main() (or Railway,
# or default) with no argument, converts the result with to_graph() and prints JSON.
EVALUATE = """
import importlib.util
import json
import sys


def first(module, names, test):
    for name in names:
        value = getattr(module, name, None)
        if test(value):
            return value
    return None


spec = importlib.util.spec_from_file_location("railway_sdk_user", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
partial = first(module, ("PARTIAL", "Partial", "partial"), bool)
entry = first(module, ("main", "Railway", "default"), bool)
project = entry() if callable(entry) else entry
if hasattr(project, "to_graph"):
    project = project.to_graph()
print(json.dumps({"partial": partial, "project": project}, default=str))
"""

MIGRATE = ["python", "-m", "backend.db.migrate"]
SHELLS = {"sh", "bash", "dash"}
# Every variable the outbox reads: the file must declare each (apply deletes the rest).
OUTBOX_VARIABLES = tuple(name for name, _default, _help in outbox.OUTBOX_VARIABLES)
_MAIN_GUARD = re.compile(r"""^if\s+__name__\s*==\s*["']__main__["']\s*:""", re.MULTILINE)
_TEMPLATE = re.compile(r"\$\{\{\s*[\w.-]+\s*\}\}")
_URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)


def evaluate_config(path: Path = CONFIG_FILE) -> dict[str, Any]:
    """Evaluate the file as the CLI does, in a python that can import railway_sdk but not
    this project (-S skips site-packages; only the SDK's directory is on the path; the
    working directory is not the checkout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(Path(railway_sdk.__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-S", "-c", EVALUATE, str(path)],
        cwd=path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"evaluating {path} failed:\n{result.stderr}"
    payload: dict[str, Any] = json.loads(result.stdout)
    return payload


def expected_workers(root: Path = ROOT) -> set[str]:
    """Worker entry points: backend.config.WORKER_NAMES, plus every module of
    backend/workers that runs as a program (a ``__main__`` guard or package)."""
    names = set(WORKER_NAMES)
    workers = root / "backend" / "workers"
    for path in workers.glob("*.py"):
        if not path.stem.startswith("_") and _MAIN_GUARD.search(path.read_text("utf-8")):
            names.add(path.stem)
    names.update(path.parent.name for path in workers.glob("*/__main__.py"))
    return names


def checklist_problems(
    rendered: dict[str, Any],
    *,
    workers: Iterable[str] | None = None,
    default_drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
) -> list[str]:
    """Every way the rendered project (the graph ``to_graph()`` returns) breaks the
    deployment checklist; empty when it complies."""
    expected = set(expected_workers() if workers is None else workers)
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = {}
    for resource in rendered.get("resources", []):
        if resource.get("type") != "service":
            continue
        name = resource.get("name", "?")
        if name in services:
            problems.append(f"{name}: declared twice")
        services[name] = resource
    for name in sorted(expected - services.keys()):
        problems.append(f"{name}: worker entry point without a Railway service")
    for name in sorted(services.keys() - expected):
        problems.append(f"{name}: service runs no worker entry point")
    for name, resource in sorted(services.items()):
        problems.extend(f"{name}: {p}" for p in service_problems(name, resource, default_drain_timeout_s))
    return problems


def service_problems(name: str, resource: dict[str, Any], default_drain_timeout_s: float) -> list[str]:
    deploy = resource.get("deploy") or {}
    variables = resource.get("variables") or {}
    return [
        *_start_problems(name, deploy.get("startCommand")),
        *_healthcheck_problems(deploy),
        *_replica_problems(deploy),
        *_restart_problems(deploy),
        *_pre_deploy_problems(deploy.get("preDeployCommand")),
        *_draining_problems(deploy, variables, default_drain_timeout_s),
        *_variable_problems(name, variables),
    ]


def _start_problems(name: str, command: Any) -> list[str]:
    if not isinstance(command, str) or not _runs_directly(command, f"backend.workers.{name}"):
        return [
            f"start command {command!r} must be `python -m backend.workers.{name}` "
            "(or `exec` it from a shell) so that Python itself receives SIGTERM"
        ]
    return []


def _runs_directly(command: str, module: str) -> bool:
    target = ["python", "-m", module]
    try:
        argv = shlex.split(command)
    except ValueError:
        return False
    if argv in (target, ["exec", *target]):
        return True
    if len(argv) == 3 and os.path.basename(argv[0]) in SHELLS and argv[1] == "-c":
        try:
            return shlex.split(argv[2]) == ["exec", *target]
        except ValueError:
            return False
    return False


def _healthcheck_problems(deploy: dict[str, Any]) -> list[str]:
    declared = {k: deploy[k] for k in ("healthcheckPath", "healthcheckTimeout") if deploy.get(k) is not None}
    if declared:
        return [f"declares a healthcheck {declared}; workers serve no HTTP"]
    return []


def _replica_problems(deploy: dict[str, Any]) -> list[str]:
    count = deploy.get("numReplicas")
    regions = deploy.get("multiRegionConfig")
    if regions:
        total = sum((cfg or {}).get("numReplicas", 0) for cfg in regions.values())
        if count is not None and count != total:
            return [f"numReplicas {count} disagrees with multiRegionConfig ({total})"]
        count = total
    if count != 1:
        return [f"must run exactly one replica, declares {count}"]
    return []


def _restart_problems(deploy: dict[str, Any]) -> list[str]:
    problems = []
    if deploy.get("restartPolicyType") != "ON_FAILURE":
        problems.append(f"restart policy {deploy.get('restartPolicyType')!r} must be ON_FAILURE")
    retries = deploy.get("restartPolicyMaxRetries")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
        problems.append(f"restart policy needs a retry limit, has {retries!r}")
    return problems


def _pre_deploy_problems(commands: Any) -> list[str]:
    if isinstance(commands, str):
        commands = [commands]
    for command in commands or []:
        try:
            if shlex.split(command) == MIGRATE:
                return []
        except ValueError:
            continue
    return [f"pre-deploy command {commands!r} must run `python -m backend.db.migrate`"]


def _draining_problems(
    deploy: dict[str, Any], variables: dict[str, Any], default_drain_timeout_s: float
) -> list[str]:
    drain_timeout = default_drain_timeout_s
    if "WORKER_DRAIN_TIMEOUT_S" in variables:
        configured = _number(_literal(variables["WORKER_DRAIN_TIMEOUT_S"]))
        if configured is None:
            return [
                "WORKER_DRAIN_TIMEOUT_S must be a literal number so that the "
                "draining window can be checked against it"
            ]
        drain_timeout = configured
    windows = {}
    if "drainingSeconds" in deploy:
        windows["deploy.drainingSeconds"] = _number(deploy["drainingSeconds"])
    if "RAILWAY_DEPLOYMENT_DRAINING_SECONDS" in variables:
        windows["RAILWAY_DEPLOYMENT_DRAINING_SECONDS"] = _number(
            _literal(variables["RAILWAY_DEPLOYMENT_DRAINING_SECONDS"])
        )
    if not windows:
        return [
            "no draining window: Railway's default of 0 sends SIGKILL right after "
            "SIGTERM; set RAILWAY_DEPLOYMENT_DRAINING_SECONDS / deploy.drainingSeconds"
        ]
    problems = [
        f"{label} is {seconds!r}, must exceed the drain timeout ({drain_timeout:g} s)"
        for label, seconds in windows.items()
        if seconds is None or seconds <= drain_timeout
    ]
    if len(set(windows.values())) > 1:
        problems.append(f"draining windows disagree: {windows}")
    return problems


def _variable_problems(name: str, variables: dict[str, Any]) -> list[str]:
    problems = []
    if _literal(variables.get("SUPABASE_MODE")) != "prod":
        problems.append("SUPABASE_MODE must be the literal prod")
    references = ["SUPABASE_DB_URL", *(OUTBOX_VARIABLES if name == "outbox_processor" else ())]
    for key in references:
        if key not in variables:
            problems.append(f"{key} is missing")
        elif not _is_reference(variables[key]):
            problems.append(f"{key} must reference a shared variable, not hold a value")
    for key in ("WORKER_DRAIN_TIMEOUT_S", "WORKER_LOG_LEVEL"):
        if key not in variables:
            problems.append(f"{key} is missing")
    if _literal(variables.get("PYTHONUNBUFFERED")) != "1":
        problems.append("PYTHONUNBUFFERED must be 1")
    for key, variable in variables.items():
        value = _literal(variable)
        if not isinstance(variable, dict) or variable.get("type") == "raw":
            problems.append(f"{key} is not a string or a reference: {variable!r}")
        elif value is not None and _URL_WITH_PASSWORD.search(value):
            problems.append(f"{key} holds a literal URL with a password")
    return problems


def _literal(variable: Any) -> str | None:
    if isinstance(variable, dict) and variable.get("type") == "literal":
        value = variable.get("value")
        return value if isinstance(value, str) else None
    return None


def _is_reference(variable: Any) -> bool:
    if isinstance(variable, dict) and variable.get("type") in ("sharedReference", "reference"):
        return True
    value = _literal(variable)
    return value is not None and _TEMPLATE.fullmatch(value.strip()) is not None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@pytest.fixture(scope="module")
def evaluated() -> dict[str, Any]:
    return evaluate_config()


@pytest.fixture
def rendered(evaluated: dict[str, Any]) -> dict[str, Any]:
    """A private copy of the rendered project that a test may mutate."""
    project: dict[str, Any] = copy.deepcopy(evaluated["project"])
    return project


def _service(rendered: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in rendered["resources"] if r.get("name") == name)


def _problems_of(rendered: dict[str, Any], name: str) -> list[str]:
    return [p for p in checklist_problems(rendered) if p.startswith(f"{name}:")]


# The file as committed


def test_the_file_passes_the_deployment_checklist(rendered: dict[str, Any]) -> None:
    assert checklist_problems(rendered) == []


def test_every_worker_name_has_a_service(rendered: dict[str, Any]) -> None:
    names = {r["name"] for r in rendered["resources"] if r["type"] == "service"}
    assert names == expected_workers()
    assert set(WORKER_NAMES) <= names


def test_secrets_compile_to_shared_variable_references(rendered: dict[str, Any]) -> None:
    # The CLI turns {"type": "sharedReference", "name": X} into ${{shared.X}}.
    for resource in rendered["resources"]:
        assert resource["variables"]["SUPABASE_DB_URL"] == {
            "type": "sharedReference",
            "name": "SUPABASE_DB_URL",
        }
    outbox = _service(rendered, "outbox_processor")["variables"]
    assert {outbox[key]["name"] for key in OUTBOX_VARIABLES} == set(OUTBOX_VARIABLES)
    assert all(outbox[key]["type"] == "sharedReference" for key in OUTBOX_VARIABLES)
    assert not any(key.startswith("OUTBOX_") for key in _service(rendered, "collectability")["variables"])


def test_the_file_manages_only_its_own_partial(evaluated: dict[str, Any]) -> None:
    # Without a named partial, apply deletes every service of the environment that
    # the file does not declare.
    assert evaluated["partial"] == "workers"


def test_workers_run_on_half_a_vcpu_and_512_mb(rendered: dict[str, Any]) -> None:
    for resource in rendered["resources"]:
        limits = resource["deploy"]["limitOverride"]["containers"]
        assert limits == {"cpu": 0.5, "memoryBytes": 512_000_000}


def test_the_build_installs_the_locked_production_set(
    rendered: dict[str, Any],
) -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires)
    assert match, f"unexpected requires-python {requires!r}"
    minimum = tuple(int(part) for part in match.groups())
    install = tomllib.loads((ROOT / ".railway" / "nixpacks.toml").read_text("utf-8"))["phases"]["install"]
    assert install["cmds"] == [
        "python -m venv --copies /opt/venv && . /opt/venv/bin/activate"
        " && pip install --no-cache-dir --require-hashes --no-deps -r .railway/requirements.lock"
    ]
    assert (ROOT / ".railway" / "requirements.lock").is_file()
    for resource in rendered["resources"]:
        assert resource["build"] == {"builder": "NIXPACKS"}
        version = resource["variables"]["NIXPACKS_PYTHON_VERSION"]["value"]
        assert tuple(int(p) for p in version.split(".")[:2]) >= minimum
        assert resource["variables"]["NIXPACKS_CONFIG_FILE"]["value"] == ".railway/nixpacks.toml"


def test_evaluation_refuses_a_window_shorter_than_the_drain() -> None:
    spec = importlib.util.spec_from_file_location("railway_config_under_test", CONFIG_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DRAINING_SECONDS = module.DRAIN_TIMEOUT_S
    with pytest.raises(ValueError, match="DRAINING_SECONDS"):
        module.main()


# The checklist catches planted mismatches


def test_checklist_reports_a_healthcheck_path(rendered: dict[str, Any]) -> None:
    _service(rendered, "escalation")["deploy"]["healthcheckPath"] = "/health"
    problems = _problems_of(rendered, "escalation")
    assert len(problems) == 1 and "healthcheck" in problems[0]


@pytest.mark.parametrize("where", ["setting", "variable", "both"])
def test_checklist_reports_a_draining_window_below_the_drain_timeout(
    rendered: dict[str, Any], where: str
) -> None:
    service = _service(rendered, "collectability")
    if where in ("setting", "both"):
        service["deploy"]["drainingSeconds"] = 20
    if where in ("variable", "both"):
        service["variables"]["RAILWAY_DEPLOYMENT_DRAINING_SECONDS"]["value"] = "20"
    problems = _problems_of(rendered, "collectability")
    assert any("must exceed the drain timeout (25 s)" in p for p in problems)


def test_checklist_measures_the_window_against_the_file_s_drain_timeout(rendered: dict[str, Any]) -> None:
    service = _service(rendered, "collectability")
    service["variables"]["WORKER_DRAIN_TIMEOUT_S"]["value"] = "45"
    problems = _problems_of(rendered, "collectability")
    assert any("must exceed the drain timeout (45 s)" in p for p in problems)


def test_checklist_falls_back_to_the_default_drain_timeout(rendered: dict[str, Any]) -> None:
    service = _service(rendered, "collectability")
    del service["variables"]["WORKER_DRAIN_TIMEOUT_S"]
    service["deploy"]["drainingSeconds"] = DEFAULT_DRAIN_TIMEOUT_S
    service["variables"]["RAILWAY_DEPLOYMENT_DRAINING_SECONDS"]["value"] = "25"
    problems = _problems_of(rendered, "collectability")
    assert sum(f"drain timeout ({DEFAULT_DRAIN_TIMEOUT_S:g} s)" in p for p in problems) == 2


def test_checklist_reports_a_missing_draining_window(rendered: dict[str, Any]) -> None:
    service = _service(rendered, "collectability")
    del service["deploy"]["drainingSeconds"]
    del service["variables"]["RAILWAY_DEPLOYMENT_DRAINING_SECONDS"]
    assert any("no draining window" in p for p in _problems_of(rendered, "collectability"))


def test_checklist_reports_two_replicas(rendered: dict[str, Any]) -> None:
    _service(rendered, "outbox_processor")["deploy"]["numReplicas"] = 2
    problems = _problems_of(rendered, "outbox_processor")
    assert problems == ["outbox_processor: must run exactly one replica, declares 2"]


@pytest.mark.parametrize(
    "command",
    [
        'sh -c "python -m backend.workers.collectability"',
        "/bin/bash -c 'python -m backend.workers.collectability'",
        "cd /app && python -m backend.workers.collectability",
        "python -m backend.workers.escalation",
        "gunicorn backend.workers.collectability",
    ],
)
def test_checklist_reports_a_start_command_that_is_not_the_worker_itself(
    rendered: dict[str, Any], command: str
) -> None:
    _service(rendered, "collectability")["deploy"]["startCommand"] = command
    problems = _problems_of(rendered, "collectability")
    assert len(problems) == 1 and "start command" in problems[0]


@pytest.mark.parametrize(
    "command",
    [
        "exec python -m backend.workers.collectability",
        'sh -c "exec python -m backend.workers.collectability"',
        "/bin/bash -c 'exec python -m backend.workers.collectability'",
    ],
)
def test_checklist_accepts_a_shell_that_execs_the_worker(rendered: dict[str, Any], command: str) -> None:
    _service(rendered, "collectability")["deploy"]["startCommand"] = command
    assert _problems_of(rendered, "collectability") == []


def test_checklist_reports_a_restart_policy_without_a_limit(rendered: dict[str, Any]) -> None:
    deploy = _service(rendered, "escalation")["deploy"]
    deploy["restartPolicyType"] = "ALWAYS"
    del deploy["restartPolicyMaxRetries"]
    problems = _problems_of(rendered, "escalation")
    assert len(problems) == 2 and all("restart policy" in p for p in problems)


def test_checklist_reports_a_missing_migration(rendered: dict[str, Any]) -> None:
    _service(rendered, "escalation")["deploy"]["preDeployCommand"] = ["python -m backend.db.migrate --check"]
    assert any("pre-deploy" in p for p in _problems_of(rendered, "escalation"))


def test_checklist_reports_a_literal_database_url(rendered: dict[str, Any]) -> None:
    _service(rendered, "escalation")["variables"]["SUPABASE_DB_URL"] = {
        "type": "literal",
        "value": "postgresql://postgres.ref:hunter2@aws-0-eu.pooler.supabase.com:5432/postgres",
    }
    problems = _problems_of(rendered, "escalation")
    assert any("SUPABASE_DB_URL must reference" in p for p in problems)
    assert any("literal URL with a password" in p for p in problems)


def test_checklist_accepts_a_template_reference(rendered: dict[str, Any]) -> None:
    _service(rendered, "escalation")["variables"]["SUPABASE_DB_URL"] = {
        "type": "literal",
        "value": "${{shared.SUPABASE_DB_URL}}",
    }
    assert _problems_of(rendered, "escalation") == []


def test_checklist_reports_a_literal_outbox_secret(rendered: dict[str, Any]) -> None:
    _service(rendered, "outbox_processor")["variables"]["OUTBOX_SMTP_PASSWORD"] = {
        "type": "literal",
        "value": "s3cret",
    }
    problems = _problems_of(rendered, "outbox_processor")
    assert problems == [
        "outbox_processor: OUTBOX_SMTP_PASSWORD must reference a shared variable, not hold a value"
    ]


def test_checklist_reports_dev_mode(rendered: dict[str, Any]) -> None:
    _service(rendered, "escalation")["variables"]["SUPABASE_MODE"]["value"] = "dev"
    assert _problems_of(rendered, "escalation") == ["escalation: SUPABASE_MODE must be the literal prod"]


def test_checklist_reports_a_worker_without_a_service(rendered: dict[str, Any]) -> None:
    rendered["resources"] = [r for r in rendered["resources"] if r["name"] != "escalation"]
    assert checklist_problems(rendered) == ["escalation: worker entry point without a Railway service"]


def test_entry_points_found_in_backend_workers_need_a_service(
    rendered: dict[str, Any], tmp_path: Path
) -> None:
    workers = tmp_path / "backend" / "workers"
    workers.mkdir(parents=True)
    (workers / "__init__.py").write_text("")
    (workers / "collectability.py").write_text('if __name__ == "__main__":\n    run()\n')
    (workers / "helpers.py").write_text("def run() -> None: ...\n")
    (workers / "reconciler.py").write_text("if __name__ == '__main__':\n    run()\n")
    found = expected_workers(tmp_path)
    assert found == {*WORKER_NAMES, "reconciler"}
    assert checklist_problems(rendered, workers=found) == [
        "reconciler: worker entry point without a Railway service"
    ]
