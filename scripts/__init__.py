"""Operational scripts, each run from the checkout as ``python -m scripts.<name>``: the demo,
the benchmarks and the chaos run, their helper workers, and the harness they share with the
tests (``scripts.harness``)."""
