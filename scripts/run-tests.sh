#!/usr/bin/env bash
# Sets up the project and runs the whole test suite (it starts its own PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One test renders the inspector's HTML report in headless Chromium: Debian's package,
# installed here when missing (as root, or with sudo).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "tests: installing Debian's chromium (for the HTML report's rendering test)"
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium; } >/dev/null \
    || echo "tests: could not install chromium; the HTML report's test will fail and say so" >&2
fi
exec .venv/bin/python -m pytest "$@"
