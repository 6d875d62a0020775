#!/usr/bin/env bash
# Sets up the project and runs the main job on the embedded PostgreSQL: seed, enqueue,
# run the three workers until the queues are empty, stop them with SIGTERM, report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m scripts.demo "$@"
