"""The documents say what the code does: commands, environment variables and their
defaults, exit codes, log events and their fields, the state diagram, the worker table,
the deployment checklist, and the files they point at.

The code side is read from the code itself (its tables, and its syntax tree where the
facts are calls), never restated here, so a change on either side fails a test until
the other side follows.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from backend.config import RAILWAY_VARIABLES, TUNABLES, WORKER_NAMES
from backend.db.embedded import PROJECT_ROOT, data_dir
from backend.domain.outbox import OUTBOX_VARIABLES
from backend.events import FIELDS, IDENTITY, TRANSITION
from backend.workers.base import BaseWorker
from backend.workers.diagram import extract_embedded, initial_state, state_diagram
from backend.workers.lifecycle import EVENTS, TRANSITIONS, State
from tests.unit.test_railway_config import evaluate_config

ROOT = Path(__file__).resolve().parents[2]
DOCS_DIR = ROOT / "docs"
GUIDE = DOCS_DIR / "RAILWAY_WORKER_CONFIG.md"
ARCHITECTURE = DOCS_DIR / "ARCHITECTURE.md"
RUNBOOK = DOCS_DIR / "RUNBOOK_DISASTER_RECOVERY.md"
OWN_DOCS = (GUIDE, ARCHITECTURE, RUNBOOK)
CODE_DIRS = (ROOT / "backend", ROOT / "tools")

# Names an environment variable of this project can have; PYTHON* has no underscore.
ENV_MENTION = re.compile(
    r"(?<![\w./$-])((?:SUPABASE|WORKER|RAILWAY|OUTBOX|DRAGONFLY|NIXPACKS)_[A-Z0-9_]*[A-Z0-9]"
    r"|PYTHON[A-Z]+)\b(?![\w.]*\.md)"
)
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
COMMAND = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)(<?)")
MAIN_GUARD = re.compile(r"""^if\s+__name__\s*==\s*["']__main__["']\s*:""", re.MULTILINE)
CODE_SPAN = re.compile(r"`([^`]+)`")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:backend|tools|scripts|tests|docs|\.railway)/[\w./-]*\w)")
EXIT_SIGKILL = 137  # never chosen by the worker: the kernel's 128 + SIGKILL
ENV_RECEIVERS = frozenset({"env", "environ", "environment"})


# --- reading the documents -----------------------------------------------------------


def documents() -> list[Path]:
    """README.md and docs/*.md, those that exist."""
    readme = ROOT / "README.md"
    return [p for p in [readme, *sorted(DOCS_DIR.glob("*.md"))] if p.exists()]


def section(path: Path, heading: str) -> list[str]:
    """The lines under ``heading`` up to the next heading of the same or a higher level."""
    lines = path.read_text("utf-8").splitlines()
    assert heading in lines, f"{path.name} has no heading {heading!r}"
    level = len(heading) - len(heading.lstrip("#"))
    body: list[str] = []
    fenced = False
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("```"):
            fenced = not fenced
        stripped = line.lstrip("#")
        if (
            not fenced
            and line.startswith("#")
            and stripped.startswith(" ")
            and len(line) - len(stripped) <= level
        ):
            break
        body.append(line)
    return body


def tables(lines: list[str], first_header: str) -> Iterator[tuple[list[str], list[list[str]]]]:
    """Every markdown table in ``lines`` whose first header cell is ``first_header``:
    (header, rows), cells stripped."""
    header: list[str] | None = None
    rows: list[list[str]] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in _split_row(line)]
            if header is None:
                header, rows = cells, []
            elif not all(set(c) <= {"-", ":"} for c in cells):
                rows.append(cells)
            continue
        if header is not None and header[0] == first_header:
            yield header, rows
        header = None


def _split_row(line: str) -> list[str]:
    # Split on pipes outside code spans (a `|` inside backticks is text).
    cells, current, in_code = [], "", False
    for char in line.strip().strip("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(current)
            current = ""
        else:
            current += char
    cells.append(current)
    return cells


def first_span(cell: str) -> str | None:
    """The code span a cell starts with, if it starts with one."""
    match = re.match(r"`([^`]*)`", cell)
    return match[1] if match else None


def table_by_first_column(path: Path, heading: str, first_header: str) -> dict[str, list[str]]:
    """Rows of the tables under ``heading``, keyed by their first cell's code span."""
    found: dict[str, list[str]] = {}
    for _, rows in tables(section(path, heading), first_header):
        for row in rows:
            key = first_span(row[0])
            assert key is not None, f"{path.name} {heading}: row without a `name`: {row}"
            assert key not in found, f"{path.name} {heading}: {key} is listed twice"
            found[key] = row
    assert found, f"{path.name} has no table starting with {first_header!r} under {heading!r}"
    return found


# --- reading the code ----------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    path: Path
    tree: ast.Module

    @property
    def constants(self) -> dict[str, str]:
        """Module-level ``NAME = "text"`` assignments."""
        out: dict[str, str] = {}
        for node in self.tree.body:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        out[target.id] = node.value.value
        return out


@cache
def code_modules() -> tuple[Module, ...]:
    paths = sorted(p for d in CODE_DIRS for p in d.rglob("*.py") if ".data" not in p.parts)
    return tuple(Module(p, ast.parse(p.read_text("utf-8"), str(p))) for p in paths)


def callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def text_of(node: ast.AST | None, module: Module) -> str | None:
    """A string constant, or a module-level name bound to one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return module.constants.get(node.id)
    return None


def _is_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in ENV_RECEIVERS) or (
        isinstance(node, ast.Attribute) and node.attr == "environ"
    )


def _environment_reads(module: Module) -> Iterator[str]:
    """Names read from the environment: ``env.get("X")``, ``os.environ["X"]``,
    ``os.getenv("X")``, and helpers called as ``helper(environ, "X")``."""
    for node in ast.walk(module.tree):
        name: str | None = None
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            name = text_of(node.slice, module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "getenv" or (node.func.attr == "get" and _is_environ(node.func.value)):
                name = text_of(node.args[0], module) if node.args else None
        if isinstance(node, ast.Call) and len(node.args) >= 2 and _is_environ(node.args[0]):
            name = name or text_of(node.args[1], module)
        if name and ENV_NAME.match(name):
            yield name


@cache
def code_variables() -> frozenset[str]:
    """Every environment variable the code reads."""
    names = {t.variable for t in TUNABLES} | set(RAILWAY_VARIABLES)
    names |= {name for name, _, _ in OUTBOX_VARIABLES}
    for module in code_modules():
        names.update(_environment_reads(module))
    return frozenset(names)


@cache
def deployment() -> dict[str, Any]:
    """``.railway/railway.py`` evaluated as the Railway CLI does."""
    return evaluate_config()["project"]


def deployment_variables() -> dict[str, dict[str, Any]]:
    """Variables the deployment sets, with their value in the first service setting them."""
    found: dict[str, dict[str, Any]] = {}
    for resource in deployment()["resources"]:
        for name, value in (resource.get("variables") or {}).items():
            found.setdefault(name, value)
    return found


def python_names() -> set[str]:
    """Module-level names of the code (``WORKER_NAMES``, ``TUNABLES``...): not variables."""
    names: set[str] = set()
    for module in code_modules():
        for node in module.tree.body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else ([node.target] if isinstance(node, ast.AnnAssign) else [])
            )
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names.add(leaf.id)
    return names


# --- events: names and fields ----------------------------------------------------------


def code_events() -> dict[str, set[str]]:
    """The catalogue: event -> the fields it may carry."""
    return {event.value: set(fields) for event, fields in FIELDS.items()}


def emitted_in_code() -> set[str]:
    """Events named as ``Event.NAME`` somewhere in backend/ or tools/ besides the catalogue."""
    named: set[str] = set()
    for module in code_modules():
        if module.path.name != "events.py":
            named.update(re.findall(r"\bEvent\.([A-Z][A-Z_]+)\b", module.path.read_text("utf-8")))
    return named


def doc_events() -> dict[str, set[str]]:
    """Event -> the field names its row in the guide lists."""
    found: dict[str, set[str]] = {}
    for header, rows in tables(section(GUIDE, "## Log events"), "event"):
        column = header.index("fields")
        for row in rows:
            name = first_span(row[0])
            assert name is not None, f"event row without a `NAME`: {row}"
            assert name not in found, f"{name} is documented twice"
            found[name] = set(CODE_SPAN.findall(row[column]))
    assert found, "no event table under ## Log events"
    return found


# --- commands ------------------------------------------------------------------------


def runs_as_program(module: str) -> bool:
    """``python -m module`` runs something: a module with a ``__main__`` guard, or a
    package with a ``__main__`` module."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return False
    if spec is None or spec.origin is None:
        return False
    if spec.submodule_search_locations is not None:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    return bool(MAIN_GUARD.search(Path(spec.origin).read_text("utf-8")))


def documented_commands() -> dict[str, set[str]]:
    """Module of every ``python -m`` in the documents -> the documents naming it."""
    found: dict[str, set[str]] = {}
    for doc in documents():
        for module, template in COMMAND.findall(doc.read_text("utf-8")):
            names = (
                [f"{module}{name}" for name in WORKER_NAMES]
                if template and module == "backend.workers."
                else [module.rstrip(".")]
            )
            for name in names:
                found.setdefault(name, set()).add(doc.name)
    return found


def test_every_documented_command_runs_as_a_program() -> None:
    commands = documented_commands()
    missing = {m: sorted(docs) for m, docs in commands.items() if not runs_as_program(m)}
    assert missing == {}, f"`python -m X` in the docs without a runnable X: {missing}"


def test_the_documented_commands_include_every_worker() -> None:
    # Guards the scan itself: a broken pattern would find nothing and pass.
    commands = documented_commands()
    expected = {f"backend.workers.{name}" for name in WORKER_NAMES}
    expected |= {"backend.db.migrate", "tools.worker_inspector"}
    assert expected <= commands.keys()
    assert all(GUIDE.name in commands[m] for m in expected)


# --- environment variables -------------------------------------------------------------


def mentioned_variables() -> dict[str, set[str]]:
    """Every environment-variable-like name the documents mention -> the documents."""
    not_variables = python_names() | code_events().keys()
    found: dict[str, set[str]] = {}
    for doc in documents():
        for name in ENV_MENTION.findall(doc.read_text("utf-8")):
            if name not in not_variables:
                found.setdefault(name, set()).add(doc.name)
    return found


def guide_variables() -> dict[str, list[str]]:
    return table_by_first_column(GUIDE, "## Environment variables", "variable")


def test_every_variable_the_docs_mention_exists() -> None:
    known = code_variables() | deployment_variables().keys()
    unknown = {name: sorted(docs) for name, docs in mentioned_variables().items() if name not in known}
    assert unknown == {}, (
        f"variables in the docs that the code never reads and the deployment never sets: {unknown}"
    )


def test_every_variable_the_code_reads_or_the_deployment_sets_is_in_the_guide() -> None:
    documented = guide_variables().keys()
    undocumented = sorted((code_variables() | deployment_variables().keys()) - documented)
    assert undocumented == [], f"missing from the guide's variable tables: {undocumented}"
    unknown = sorted(documented - code_variables() - deployment_variables().keys())
    assert unknown == [], f"in the guide's variable tables but unknown to the code: {unknown}"


def test_the_scan_finds_variables_read_outside_the_tables() -> None:
    # Guards the syntax-tree scan: these are read with env.get, os.environ.get, a helper
    # taking the environment, and a module constant holding the name.
    assert {
        "SUPABASE_MODE",
        "SUPABASE_DB_URL",
        "WORKER_VERSION",
        "DRAGONFLY_DATA_DIR",
        "OUTBOX_SMTP_PASSWORD",
        "OUTBOX_SMTP_TLS",
    } <= code_variables()


def _same_value(text: str, value: Any) -> bool:
    try:
        return float(text) == float(value)
    except (TypeError, ValueError):
        return text == str(value)


def _default_problem(name: str, cell: str, default: Any) -> str | None:
    if default is None:
        return None if cell.startswith("unset") else f"{name}: says {cell!r}, the code: unset"
    span = first_span(cell)
    if span is None or not _same_value(span, default):
        return f"{name}: says {cell!r}, the code: {default!r}"
    return None


def test_documented_defaults_are_the_code_s() -> None:
    rows = guide_variables()
    defaults: dict[str, Any] = {t.variable: t.default for t in TUNABLES}
    defaults.update({name: default for name, default, _ in OUTBOX_VARIABLES})
    defaults["DRAGONFLY_DATA_DIR"] = data_dir({}).relative_to(PROJECT_ROOT).as_posix()
    problems = [
        p for name, default in defaults.items() if (p := _default_problem(name, rows[name][1], default))
    ]
    assert problems == [], "\n".join(problems)


def test_variables_only_the_deployment_sets_show_its_value() -> None:
    rows = guide_variables()
    problems = []
    for name, value in deployment_variables().items():
        literal = value.get("value") if value.get("type") == "literal" else None
        if name in code_variables() or literal is None:
            continue
        if f"`.railway/railway.py` sets `{literal}`" not in rows[name][1]:
            problems.append(f"{name}: the default cell should say the file sets `{literal}`")
    assert problems == [], "\n".join(problems)


# --- exit codes ------------------------------------------------------------------------


def code_exit_codes() -> dict[str, int]:
    """``EXIT_*`` constants of ``backend`` (plain or tuple assignments)."""
    found: dict[str, int] = {}
    for module in code_modules():
        if ROOT / "backend" not in module.path.parents:
            continue
        for node in module.tree.body:
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                pairs: list[tuple[ast.AST, ast.AST]] = [(target, node.value)]
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(target.elts, node.value.elts, strict=True))
                for name, value in pairs:
                    if (
                        isinstance(name, ast.Name)
                        and name.id.startswith("EXIT_")
                        and isinstance(value, ast.Constant)
                        and isinstance(value.value, int)
                    ):
                        found[name.id] = value.value
    return found


def test_the_exit_code_table_is_exactly_the_code_s() -> None:
    constants = code_exit_codes()
    assert {"EXIT_OK", "EXIT_FAILURE", "EXIT_SIGNAL"} <= constants.keys()
    documented = sorted(int(code) for code in table_by_first_column(GUIDE, "## Exit codes", "code"))
    expected = sorted({*constants.values(), EXIT_SIGKILL})
    assert documented == expected, (
        f"the guide's exit codes {documented}, the code's {constants} plus {EXIT_SIGKILL} (SIGKILL)"
    )


# --- log events --------------------------------------------------------------------------


def test_the_guide_s_event_table_is_the_catalogue() -> None:
    code, doc = set(code_events()), set(doc_events())
    assert sorted(code - doc) == [], (
        f"in backend/events.py but not in the guide's event table: {sorted(code - doc)}"
    )
    assert sorted(doc - code) == [], (
        f"in the guide's event table but not in backend/events.py: {sorted(doc - code)}"
    )


def test_documented_fields_are_the_catalogue_s() -> None:
    doc = doc_events()
    problems = []
    for event, fields in sorted(code_events().items()):
        if missing := sorted(fields - doc[event]):
            problems.append(f"{event}: the catalogue declares {missing}, the guide does not list them")
        if extra := sorted(doc[event] - fields):
            problems.append(f"{event}: the guide lists {extra}, the catalogue does not declare them")
    assert problems == [], "\n".join(problems)


def test_every_event_of_the_catalogue_is_emitted_somewhere() -> None:
    unused = sorted(set(code_events()) - emitted_in_code())
    assert unused == [], f"events no code names: {unused}"


def test_lifecycle_events_carry_the_contract_s_fields() -> None:
    events = code_events()
    identity_and_transition = {*IDENTITY, *TRANSITION}
    for event in EVENTS.values():
        assert identity_and_transition <= events[event]
    assert {"db_status", "error", "error_type"} <= events["WORKER_BOOT"]
    assert {"reason", "in_flight", "drain_timeout_s"} <= events["WORKER_DRAINING"]
    assert {"reason", "drained", "uptime_s", "jobs_processed", "jobs_failed", "exit_code"} <= events[
        "WORKER_SHUTDOWN"
    ]
    assert {"error", "error_type", "traceback", "state_before", "exit_code", "rss_mb"} <= events[
        "WORKER_CRASH"
    ]


# --- the state diagram -------------------------------------------------------------------

_EDGE = re.compile(r"^\s*(\[\*\]|\w+)\s*-->\s*(\[\*\]|\w+)\s*(?::\s*(.*))?$")


def test_the_architecture_diagram_is_the_generated_one() -> None:
    embedded = extract_embedded(ARCHITECTURE.read_text("utf-8"))
    assert embedded == state_diagram(), (
        "docs/ARCHITECTURE.md is out of date: "
        "run python -m scripts.state_diagram --write docs/ARCHITECTURE.md"
    )


def test_the_architecture_diagram_draws_the_transition_table() -> None:
    # Read back independently of the generator, so a generator bug fails too.
    lines = extract_embedded(ARCHITECTURE.read_text("utf-8")).splitlines()
    assert lines[0] == "stateDiagram-v2"
    drawn: set[tuple[str, str, str]] = set()
    starts, ends = set(), set()
    for line in lines[1:]:
        match = _EDGE.match(line)
        assert match, f"not an arrow: {line!r}"
        source, dest, label = match[1], match[2], match[3] or ""
        if source == "[*]":
            starts.add(dest)
            continue
        if dest == "[*]":
            ends.add(source)
            continue
        triggers, _, event = label.partition(" / ")
        assert event == EVENTS[State(dest)], line
        drawn |= {(source, dest, t.strip()) for t in triggers.split(",")}
    table = {(s.value, d.value, t) for t, sources, d in TRANSITIONS for s in sources}
    assert drawn == table
    assert starts == {initial_state().value}
    assert ends == {s.value for s in State} - {s for s, _, _ in table}


def test_the_architecture_lists_every_runtime_module() -> None:
    text = ARCHITECTURE.read_text("utf-8")
    modules = sorted(p.name for p in (ROOT / "backend" / "workers").glob("*.py") if p.name != "__init__.py")
    unlisted = [m for m in modules if m not in text]
    assert unlisted == [], f"backend/workers modules missing from ARCHITECTURE.md: {unlisted}"


# --- the guide's worker table and deployment checklist ---------------------------------


def worker_classes() -> dict[str, type[BaseWorker]]:
    found: dict[str, type[BaseWorker]] = {}
    for name in WORKER_NAMES:
        module = importlib.import_module(f"backend.workers.{name}")
        classes = [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, BaseWorker) and c.__module__ == module.__name__
        ]
        assert len(classes) == 1, f"backend.workers.{name} defines {classes}"
        found[name] = classes[0]
    return found


def test_the_quick_reference_is_the_code_s() -> None:
    rows = table_by_first_column(GUIDE, "## Quick reference", "service")
    documented = {name: [first_span(cell) or cell for cell in row[1:]] for name, row in rows.items()}
    expected = {
        name: [f"python -m backend.workers.{name}", f"q_{cls.name}", cls.kind]
        for name, cls in worker_classes().items()
    }
    assert documented == expected, f"the guide: {documented}\nthe code: {expected}"


def _service_settings(resource: dict[str, Any]) -> dict[str, str]:
    """The checklist's settings as the rendered service has them, written as the guide
    writes them (`<name>` for the service's name)."""
    deploy = resource.get("deploy") or {}
    variables = resource.get("variables") or {}
    limits = (deploy.get("limitOverride") or {}).get("containers") or {}
    pre_deploy = deploy.get("preDeployCommand")
    settings = {
        "start command": str(deploy.get("startCommand")).replace(resource["name"], "<name>"),
        "pre-deploy command": " && ".join(pre_deploy) if isinstance(pre_deploy, list) else str(pre_deploy),
        "healthcheck": "none"
        if not (deploy.get("healthcheckPath") or deploy.get("healthcheckTimeout"))
        else str(deploy.get("healthcheckPath")),
        "replicas": str(deploy.get("numReplicas")),
        "restart policy": str(deploy.get("restartPolicyType")),
        "restart retries": str(deploy.get("restartPolicyMaxRetries")),
        "draining window (s)": _one_value(
            deploy.get("drainingSeconds"), variables.get("RAILWAY_DEPLOYMENT_DRAINING_SECONDS")
        ),
        "CPU (vCPU)": f"{limits.get('cpu', 0):g}",
        "memory (MB)": f"{limits.get('memoryBytes', 0) / 1_000_000:g}",
    }
    for name, value in variables.items():
        settings[name] = _variable_text(value)
    return settings


def _variable_text(value: dict[str, Any]) -> str:
    if value.get("type") == "sharedReference":
        return f"${{{{shared.{value['name']}}}}}"
    return str(value.get("value"))


def _one_value(setting: Any, variable: dict[str, Any] | None) -> str:
    values = {
        f"{float(setting):g}" if setting is not None else "unset",
        f"{float(_variable_text(variable)):g}" if variable else "unset",
    }
    return values.pop() if len(values) == 1 else f"disagree: {sorted(values)}"


def test_the_deployment_checklist_is_the_railway_file_s() -> None:
    rows = [row for _, rows in tables(section(GUIDE, "## Deployment checklist"), "setting") for row in rows]
    assert rows, "no checklist table"
    checklist = {first_span(row[0]) or row[0]: first_span(row[1]) or row[1] for row in rows}
    services = [r for r in deployment()["resources"] if r.get("type") == "service"]
    assert sorted(r["name"] for r in services) == sorted(WORKER_NAMES)
    problems = []
    for resource in services:
        actual = _service_settings(resource)
        for setting, value in checklist.items():
            if setting not in actual:
                problems.append(f"{resource['name']}: no {setting!r} in .railway/railway.py")
            elif actual[setting] != value:
                problems.append(
                    f"{resource['name']}: {setting} is {actual[setting]!r}, the guide says {value!r}"
                )
    assert problems == [], "\n".join(problems)


# --- files the documents point at ----------------------------------------------------


@pytest.mark.parametrize("doc", OWN_DOCS, ids=lambda p: p.name)
def test_files_named_in_the_document_exist(doc: Path) -> None:
    named = {m.rstrip(".") for m in REPO_PATH.findall(doc.read_text("utf-8"))}
    missing = sorted(p for p in named if "<" not in p and not (ROOT / p).exists())
    assert missing == [], f"{doc.name} names files that do not exist: {missing}"
