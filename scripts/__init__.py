"""Operational scripts: benchmarks and their helper workers (``python -m scripts.<name>``)."""
