"""Worker runtime benchmark: the plain pgmq loop as the baseline, then the real worker.

    python -m scripts.bench                 # ~4 minutes: --repeat 3, 40,000 jobs per run
    python -m scripts.bench --quick         # ~1 minute: one run of each, smaller volumes
    python -m scripts.bench --url postgresql://... --wipe   # a database you can spare

Without ``--url`` it starts a fresh embedded PostgreSQL in ``.data/bench-pg`` (emptied
first, stopped at the end unless ``--keep-running``), with ``pg_stat_statements`` loaded so
that an idle worker's statements can be counted. Every worker is a real process
(``python -m scripts.bench_worker``, a no-op transactional worker, and
``python -m backend.workers.collectability``) in prod mode against the running database.

It prints one table (median, min and max of ``--repeat`` runs, the target, PASS/MISS and
the ratio of the median to the limit), writes ``bench-results/bench.json`` and draws
``bench-results/bench.png``. Exit 0 when every target passes, 1 when one misses.
``docs/BENCHMARKS.md`` says what each figure means and how it is measured.

The modules, by concern: ``__main__`` (the command line and the order of the runs),
``plan`` (names, volumes, collected samples), ``database`` (the server, the counting role,
queue fills), ``workers`` (starting a worker, waiting for it), ``throughput`` and
``latency`` (the runs), ``figures`` (targets, verdicts, the table), ``profiling`` and
``frames`` (``--profile``), ``output`` (bench.json, the chart).
"""
