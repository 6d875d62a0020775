"""Every command the README and the demo print, run as printed on a fresh clone.

    python -m scripts.check_commands [--with-tests]

Clones this checkout's HEAD into a temporary folder and runs there, in a shell that did
what the README says (nothing, for the two first commands; `. .venv/bin/activate` once,
for the others): `bash scripts/run-demo.sh` first (it creates .venv), then every command
of the README's code spans and blocks that starts with `python -m`, `bash ` or
`. .venv/bin/activate`, then the commands the demo printed at its end. A command passes
when it runs: no traceback and no missing module, and an exit code from its expected set
(a worker is stopped with SIGTERM once it logged WORKER_BOOT, and must exit 0). The
second README command (`bash scripts/run-tests.sh`, the whole suite) runs only with
`--with-tests` (CI runs it on a fresh clone anyway), the benchmark and the 5-minute chaos
run only with `--with-long`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACTIVATE = ". .venv/bin/activate"
_SPAN = re.compile(r"`([^`\n]+)`")
_STARTS = ("python -m ", "bash scripts/", ACTIVATE)
LONG = ("python -m scripts.bench", "python -m scripts.chaos")  # minutes each
# Exit codes that mean "ran as printed" for commands that need more than their name.
EXPECTED = {
    "python -m tools.worker_inspector": {0, 1},
    "python -m backend.enqueue": {2},  # the table names the command: usage, not a crash
    "python -m backend.db.embedded": {2},
    "python -m scripts.bench": {0, 1},  # 1: a target missed (it ran; the figures say which)
}


def readme_commands(text: str) -> list[str]:
    """The commands a reader would type, in README order, each once."""
    found: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            found.append(line.split("  #")[0].strip())
    found += [m.strip() for m in _SPAN.findall(text)]
    commands = [c for c in found if c.startswith(_STARTS) and "..." not in c and "<" not in c]
    return list(dict.fromkeys(commands))


def demo_commands(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(ACTIVATE + " &&")]


def run(command: str, cwd: Path, *, activated: bool, timeout: float = 900) -> tuple[int, str]:
    script = f"{ACTIVATE} && {command}" if activated and not command.startswith(ACTIVATE) else command
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    if re.search(r"python -m backend\.workers\.\w+$", command):
        return _run_worker(script, cwd, env)
    done = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout + done.stderr


def _run_worker(script: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    # exec: the signal goes to the worker itself, as Railway's would.
    proc = subprocess.Popen(
        ["bash", "-c", script.replace("&& python -m", "&& exec python -m")],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "WORKER_BOOT" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=60)
    return proc.returncode, "".join(lines) + rest


def check(command: str, code: int, output: str) -> str | None:
    if "Traceback" in output or "No module named" in output or "command not found" in output:
        return "it failed to run: " + output.strip().splitlines()[-1][:200]
    expected = EXPECTED.get(command.removeprefix(ACTIVATE + " && "), {0})
    if code not in expected:
        return f"exit {code}, expected {sorted(expected)}: " + (output.strip().splitlines() or [""])[-1][:200]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.check_commands", description=__doc__)
    parser.add_argument("--with-tests", action="store_true", help="also run bash scripts/run-tests.sh")
    parser.add_argument(
        "--with-long", action="store_true", help="also run the benchmark and the 5-minute chaos run"
    )
    args = parser.parse_args(argv)
    readme = readme_commands((ROOT / "README.md").read_text())
    failures = 0
    with tempfile.TemporaryDirectory(prefix="fresh-clone-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        results: list[tuple[str, float, str | None]] = []
        started = time.monotonic()
        code, demo_out = run("bash scripts/run-demo.sh", clone, activated=False)
        results.append(("bash scripts/run-demo.sh", time.monotonic() - started, check("", code, demo_out)))
        for command in [*readme, *demo_commands(demo_out)]:
            if command == "bash scripts/run-demo.sh" or command == ACTIVATE:
                continue
            if command.startswith("bash scripts/run-tests.sh") and not args.with_tests:
                results.append((command, 0.0, "skipped (--with-tests runs it)"))
                continue
            if command.startswith(LONG) and not args.with_long:
                results.append((command, 0.0, "skipped (--with-long runs it)"))
                continue
            started = time.monotonic()
            activated = not command.startswith("bash scripts/")
            code, out = run(command, clone, activated=activated)
            results.append((command, time.monotonic() - started, check(command, code, out)))
        run("python -m backend.db.embedded stop", clone, activated=True)
    for command, took, problem in results:
        status = "ok  " if problem is None else ("skip" if problem.startswith("skipped") else "FAIL")
        failures += status == "FAIL"
        print(f"{status} {took:6.1f} s  {command}" + (f"\n       {problem}" if problem else ""))
    print(json.dumps({"commands": len(results), "failed": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
