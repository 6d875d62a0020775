"""Entry point of ``python -m tools.worker_inspector``."""

from __future__ import annotations

from tools.worker_inspector.cli import main

raise SystemExit(main())
