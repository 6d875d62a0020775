"""The worker inspector: health of workers, queues, claims and dead letters.

    python -m tools.worker_inspector [--json] [--all] ...
    python -m tools.worker_inspector dead-letters list|replay ...

See docs/WORKER_INSPECTOR.md for every option, the exit codes and the JSON shape.
"""
