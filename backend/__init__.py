"""Dragonfly queue workers: the runtime, the workers and their database layer."""

from __future__ import annotations

__version__ = "0.1.0"
