#!/usr/bin/env bash
# Sets up the project and runs the whole test suite (it starts its own PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
