"""What one transactional batch costs, against the plain pgmq loop and against another
commit's runtime, measured batch by batch in one process so the machine's drift cancels.

    python -m scripts.batch_cost                      # this tree's no-op batch vs the pgmq loop
    python -m scripts.batch_cost --against 5bd2014    # ... and vs that commit's runtime
    python -m scripts.batch_cost --handler collectability --against 5bd2014   # scoring batches

On a shared 2-core machine the speed moves by a third from one minute to the next, so two
worker runs a minute apart cannot tell a 5% change. Here every round runs one batch of the
plain loop (``pgmq.read`` of 100, one ``pgmq.delete``), then one no-op batch of each
runtime (their order alternating), each on its own queue of a fresh embedded server; the
medians of the per-batch times are compared. ``--against REV`` exports ``backend/`` of REV
(``git archive``) and imports it as the package ``backend_ref`` beside this tree's.
``--handler collectability`` runs each runtime's own collectability handler instead of the
no-op one, each on judgments of its own (seeded first, one job per judgment).

The figures are per batch of the processor alone, in process: no worker process, heartbeat
or housekeeping thread, so the ratio to the loop is higher here than in
``python -m scripts.bench``, which is the measure of the targets.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from scripts.bench.database import JUDGMENT_BODIES, BenchDatabase, start_embedded
from scripts.bench.plan import BASE_QUEUE, BENCH_QUEUE, ORG, VT_S
from scripts.bench.throughput import seed_judgments
from scripts.harness.process import ROOT

REF_PACKAGE = "backend_ref"
REF_QUEUE = "q_bench_ref"
_IMPORT = re.compile(r"\bbackend\.")
WARMUP = 20  # batches left out of the medians: statements not yet prepared, caches cold
BATCH = 100
HANDLERS = ("noop", "collectability")


class _NoOp:
    def handle(self, conn: Any, job: Any) -> None:
        pass

    def handle_batch(self, conn: Any, jobs: list[Any]) -> None:
        pass


def export_reference(rev: str, into: Path) -> None:
    """REV's ``backend/`` as the package ``backend_ref`` under ``into``."""
    archive = subprocess.run(
        ["git", "archive", rev, "backend"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into / "src", filter="data")
    (into / "src" / "backend").rename(into / REF_PACKAGE)
    for path in (into / REF_PACKAGE).rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        text = _IMPORT.sub(f"{REF_PACKAGE}.", text).replace(
            "from backend import", f"from {REF_PACKAGE} import"
        )
        path.write_text(text, encoding="utf-8")
    sys.path.insert(0, str(into))


def forget_reference(into: Path) -> None:
    """Undo ``export_reference``: its folder off the import path, its modules unloaded."""
    if str(into) in sys.path:
        sys.path.remove(str(into))
    for name in [m for m in sys.modules if m == REF_PACKAGE or m.startswith(f"{REF_PACKAGE}.")]:
        del sys.modules[name]


def handler_of(package: str, handler: str) -> Any:
    """The no-op handler, or ``package``'s collectability worker (its handler reads no
    settings, so it is made without them)."""
    if handler == "noop":
        return _NoOp()
    worker = importlib.import_module(f"{package}.workers.collectability").CollectabilityWorker
    return object.__new__(worker)


def _first_module(package: str, *names: str) -> ModuleType:
    """The first of ``names`` that ``package`` has: a module renamed since an older commit
    is still found there under its old name."""
    for name in names:
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
    raise ModuleNotFoundError(f"{package} has none of {names}")


def processor(package: str, url: str, queue: str, name: str, handler: Any = None) -> tuple[Any, Any, Any]:
    """A ``TransactionalProcessor`` of ``package`` on ``queue`` (no-op unless ``handler``),
    its connection and its crash record (older commits: ``TransactionalStrategy``, and the
    modules ``deliveries`` and ``delivery``)."""
    transactional = importlib.import_module(f"{package}.workers.transactional")
    crash_record = _first_module(package, "workers.crash_record", "workers.deliveries")
    records = _first_module(package, "workers.records", "workers.delivery")
    connect: Callable[..., Any] = importlib.import_module(f"{package}.db.connect").connect
    deliveries = crash_record.DeliveryLog(
        queue_name=queue, worker_id=name, open_conn=lambda: connect(url, f"{name}:deliveries")
    )
    kind = getattr(transactional, "TransactionalProcessor", None) or transactional.TransactionalStrategy
    made = kind(
        handler=handler or _NoOp(),
        deliveries=deliveries,
        queue=queue,
        worker_id=name,
        options=records.ProcessingOptions(),
    )
    return made, connect(url, name), deliveries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.batch_cost", description=__doc__)
    parser.add_argument("--against", metavar="REV", help="a commit whose runtime to compare with")
    parser.add_argument("--batches", type=int, default=600, help="rounds (default 600)")
    parser.add_argument(
        "--handler", choices=HANDLERS, default="noop", help="what each batch runs (default noop)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batch-cost-") as tmp:
        try:
            times = run(Path(tmp), args.against, args.batches + WARMUP, args.handler)
        finally:
            forget_reference(Path(tmp))
    report({k: v[WARMUP:] for k, v in times.items()}, args.against, args.handler)
    return 0


def run(tmp: Path, against: str | None, rounds: int, handler: str = "noop") -> dict[str, list[float]]:
    """A fresh server in ``tmp``, a filled queue per runtime and for the loop; the times."""
    runtimes = {"this tree": ("backend", BENCH_QUEUE)}
    if against:
        export_reference(against, tmp)
        runtimes[against] = (REF_PACKAGE, REF_QUEUE)
    server, url = start_embedded(tmp / "pg")
    made: dict[str, tuple[Any, Any, Any]] = {}
    db: BenchDatabase | None = None
    try:
        db = BenchDatabase(url)
        db.prepare()
        jobs = rounds * BATCH
        judgments = seed_judgments(db, jobs * len(runtimes)) if handler == "collectability" else []
        for i, (_, queue) in enumerate(runtimes.values()):
            db.conn.execute("SELECT pgmq.create(%s)", (queue,))
            if judgments:
                own = {"tag": queue, "org": ORG, "ids": judgments[i * jobs : (i + 1) * jobs]}
                db.fill(queue, JUDGMENT_BODIES, own, jobs)
            else:
                db.fill_bench(queue, jobs, queue)
        db.fill_bench(BASE_QUEUE, jobs, "base")
        for i, (label, (package, queue)) in enumerate(runtimes.items()):
            made[label] = processor(package, url, queue, f"cost-{i}", handler_of(package, handler))
        times = measure(url, made, rounds, BATCH)
        if judgments:  # every job scored, or the times measured something else
            row = db.conn.execute("SELECT count(*) AS n FROM dragonfly.collectability_scores").fetchone()
            if row is None or row["n"] != len(judgments):
                raise RuntimeError(f"{row and row['n']} scores stored for {len(judgments)} jobs")
        return times
    finally:
        for _, conn, deliveries in made.values():
            deliveries.close()
            conn.close()
        if db is not None:
            db.conn.close()
        server.stop()


def measure(
    url: str, made: dict[str, tuple[Any, Any, Any]], rounds: int, batch: int
) -> dict[str, list[float]]:
    """Seconds per batch: the loop's, then each runtime's, round after round."""
    times: dict[str, list[float]] = {"pgmq loop": [], **{label: [] for label in made}}
    order = list(made)
    with psycopg.connect(url, autocommit=True) as loop:
        for i in range(rounds):
            started = time.perf_counter()
            rows = loop.execute(
                "SELECT msg_id FROM pgmq.read(%s, %s, %s)", (BASE_QUEUE, VT_S, batch)
            ).fetchall()
            loop.execute("SELECT pgmq.delete(%s, %s::bigint[])", (BASE_QUEUE, [r[0] for r in rows]))
            times["pgmq loop"].append(time.perf_counter() - started)
            for label in order if i % 2 == 0 else reversed(order):
                runtime, conn, _ = made[label]
                started = time.perf_counter()
                taken = runtime.process(conn)
                times[label].append(time.perf_counter() - started)
                if taken != batch:
                    raise RuntimeError(f"{label} took {taken} messages, not {batch}")
    return times


def report(times: dict[str, list[float]], against: str | None, handler: str = "noop") -> None:
    loop = statistics.median(times["pgmq loop"])
    rounds = len(times["pgmq loop"])
    print(f"{rounds} rounds, batch of {BATCH}, {handler} handler; median ms per batch (loop / it):")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"  {label:<12} {median * 1000:7.3f} ms   {loop / median:5.2f}")
    if against:
        ours, theirs = statistics.median(times["this tree"]), statistics.median(times[against])
        print(f"this tree / {against}: {ours / theirs:.3f} of its time per batch")


if __name__ == "__main__":
    raise SystemExit(main())
