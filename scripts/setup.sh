#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its dev and local extras: the
# test tools, and the embedded PostgreSQL with pgmq's SQL for local development (neither
# of which production installs). Sourced by run-demo.sh and run-tests.sh; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the project into .venv with its dev and local extras (a minute the first time)"
  log=.venv/setup.log  # pip's own output, shown only when it fails
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip \
         && .venv/bin/python -m pip install --disable-pip-version-check -e ".[dev,local]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup: pip failed (the end of its output is above; all of it in $log)" >&2
    exit 1
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
  echo "setup: done; the project's Python is .venv/bin/python"
fi
