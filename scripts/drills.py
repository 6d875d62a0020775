"""Operability drills: each row of the guide's troubleshooting table, staged for real, and
what the on-call engineer sees: the event line, and the inspector's verdict and exit code.

    python -m scripts.drills                    # every drill, on a fresh embedded server
    python -m scripts.drills frozen_worker ...  # some of them
    python -m scripts.drills --url URL          # on that database (it must be one to spare)
    python -m scripts.drills --defaults         # at the production settings, with restarts

Short heartbeat settings make a verdict come in seconds instead of minutes: every worker
runs with ``WORKER_HEARTBEAT_INTERVAL_S=1`` and ``WORKER_VISIBILITY_TIMEOUT_S=3``, so "two
heartbeat intervals" is the inspector's floor of 5 s. Each drill waits at most 60 s for its
verdict. ``tests/acceptance/test_drills.py`` runs every drill in the test suite.

``--defaults`` runs the drills of ``scripts/drills_railway.py`` instead: the workers'
default settings (30 s heartbeat and visibility timeout), a new instance 2-5 s after each
exit as Railway's restart policy does, and a table of what the inspector said, how soon
after the first failure, and whether it kept saying it while the restarts went on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from backend.enqueue import build_envelope, enqueue
from scripts.harness.process import WorkerProcess, inherited_env
from scripts.harness.receivers import HttpRecorder

ROOT = Path(__file__).resolve().parents[1]
VERDICT_WITHIN_S = 60.0
SHORT = {"WORKER_HEARTBEAT_INTERVAL_S": "1", "WORKER_VISIBILITY_TIMEOUT_S": "3", "WORKER_BOOT_TIMEOUT_S": "5"}


class DrillFailed(AssertionError):
    """The operator would not have seen what the drill expects."""


@dataclass
class Seen:
    """What a drill showed the operator."""

    event: str = ""  # the log line that names the failure (its event and key fields)
    inspector_exit: int | None = None
    reason: str = ""  # the inspector's finding that names it
    verdict_after_s: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Drill:
    """One troubleshooting row: the context it runs in, and what it leaves behind."""

    url: str
    workers: list[WorkerProcess] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        settings = {"SUPABASE_MODE": "dev", "SUPABASE_DB_URL": self.url, "PYTHONUNBUFFERED": "1", **SHORT}
        return inherited_env(**{**settings, **extra})

    def conn(self) -> Any:
        return _connection(self.url)

    def spawn(self, module: str = "backend.workers.collectability", **extra: str) -> WorkerProcess:
        worker = WorkerProcess(module, self.env(**extra))
        self.workers.append(worker)
        return worker

    def inspector(self, url: str | None = None) -> tuple[int, dict[str, Any] | None, str]:
        done = subprocess.run(
            [sys.executable, "-m", "tools.worker_inspector", "--json"],
            cwd=ROOT,
            env=inherited_env(SUPABASE_MODE="dev", SUPABASE_DB_URL=url or self.url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            doc = json.loads(done.stdout) if done.returncode in (0, 1) else None
        except json.JSONDecodeError:
            doc = None  # cut short: what it printed on stderr says why
        return (
            done.returncode,
            doc,
            (done.stderr if doc is not None else done.stderr or done.stdout[:300]).strip(),
        )

    def await_reason(self, code: str, subject: str | None, since: float, seen: Seen) -> dict[str, Any]:
        """Poll the inspector until ``code`` (for ``subject``) is among its reasons."""
        deadline = since + VERDICT_WITHIN_S
        while True:
            exit_code, doc, err = self.inspector()
            found: list[dict[str, Any]] = [
                r
                for r in (doc or {}).get("reasons", [])
                if r["code"] == code and (subject is None or r["subject"] == subject)
            ]
            if found:
                seen.inspector_exit, seen.reason = exit_code, f"{code}: {found[0]['message']}"
                seen.verdict_after_s = round(time.monotonic() - since, 1)
                if exit_code != 1:
                    raise DrillFailed(f"reason {code} with exit {exit_code}, not 1")
                return found[0]
            if time.monotonic() > deadline:
                raise DrillFailed(f"no {code} reason within {VERDICT_WITHIN_S:g} s; last: {doc or err}")
            time.sleep(0.5)

    def await_alive(self, worker_id: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, doc, _ = self.inspector()
            if any(
                w["worker_id"] == worker_id and w["verdict"] == "alive"
                for w in (doc or {}).get("workers", [])
            ):
                return
            time.sleep(0.3)
        raise DrillFailed(f"{worker_id} never showed alive")

    def close(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGCONT)
            worker.stop()


def config_crash_loop(d: Drill) -> Seen:
    """A bad variable on every boot: Railway restarts the worker, and it fails the same way."""
    seen = Seen()
    started = time.monotonic()
    for _ in range(3):
        worker = d.spawn(WORKER_BATCH_SIZE="abc")
        if worker.wait_exit(timeout=30) != 1:
            raise DrillFailed("a configuration error did not exit 1")
        crash = worker.named("WORKER_CRASH")
        if not crash or crash[0].get("variable") != "WORKER_BATCH_SIZE":
            raise DrillFailed(f"no WORKER_CRASH naming WORKER_BATCH_SIZE: {worker.tail(3)}")
    seen.event = f"WORKER_CRASH error_type={crash[0]['error_type']} variable=WORKER_BATCH_SIZE exit 1"
    d.await_reason("crash_loop", "q_collectability", started, seen)
    return seen


def unreachable_database(d: Drill) -> Seen:
    """The database does not answer: the worker retries for WORKER_BOOT_TIMEOUT_S, then
    exits 1; the inspector cannot connect and says so in one line, exit 2."""
    seen = Seen()
    port = _closed_port()
    url = f"postgresql://postgres:drill-secret@127.0.0.1:{port}/postgres"
    worker = WorkerProcess("backend.workers.collectability", d.env(SUPABASE_DB_URL=url))
    d.workers.append(worker)
    started = time.monotonic()
    if worker.wait_exit(timeout=30) != 1:
        raise DrillFailed("a worker with no database did not exit 1")
    retries = worker.named("DB_BOOT_RETRY")
    crash = worker.named("WORKER_CRASH")
    if not retries or not crash:
        raise DrillFailed(f"expected DB_BOOT_RETRY then WORKER_CRASH: {worker.tail(3)}")
    seen.event = (
        f"{len(retries)} x DB_BOOT_RETRY, then WORKER_CRASH error_type={crash[0]['error_type']} exit 1"
    )
    exit_code, _, err = d.inspector(url)
    seen.inspector_exit, seen.reason = exit_code, err
    seen.verdict_after_s = round(time.monotonic() - started, 1)
    if exit_code != 2 or len(err.splitlines()) != 1 or "cannot connect" not in err:
        raise DrillFailed(f"inspector: exit {exit_code}, {err!r}")
    if "drill-secret" in "".join(worker.lines) + err:
        raise DrillFailed("the password was printed")
    return seen


def kill_loop(d: Drill) -> Seen:
    """SIGKILL (the OOM killer) three times: three dead rows, a crash loop."""
    seen = Seen()
    started = time.monotonic()
    ids = []
    for _ in range(3):
        worker = d.spawn()
        worker_id = worker.wait_boot()["worker_id"]
        d.await_alive(worker_id)
        worker.send(signal.SIGKILL)
        worker.wait_exit(timeout=10)
        ids.append(worker_id)
    seen.event = "none: a killed process writes nothing; its row stays RUNNING"
    dead = d.await_reason("dead_worker", ids[-1], started, seen)
    seen.notes.append(dead["message"])
    d.await_reason("crash_loop", "q_collectability", started, seen)
    return seen


def sigterm_every_few_seconds(d: Drill, period_s: float = 3.0) -> Seen:
    """Railway redeploying over and over: each SIGTERM drains and exits 0, and the
    inspector stays healthy (clean stops are no crash loop)."""
    seen = Seen()
    for _ in range(3):
        worker = d.spawn()
        worker.wait_boot()
        time.sleep(period_s)
        worker.send(signal.SIGTERM)
        if worker.wait_exit(timeout=30) != 0:
            raise DrillFailed("a SIGTERM did not end in exit 0")
        shutdown = worker.named("WORKER_SHUTDOWN")
        if not shutdown or not shutdown[-1].get("drained"):
            raise DrillFailed(f"no drained WORKER_SHUTDOWN: {worker.tail(3)}")
    seen.event = "WORKER_SHUTDOWN drained=true exit 0, three times"
    exit_code, doc, err = d.inspector()
    seen.inspector_exit = exit_code
    seen.reason = "healthy" if exit_code == 0 else f"{doc and doc['reasons']} {err}"
    if exit_code != 0:
        raise DrillFailed(f"three clean stops made the inspector say {seen.reason}")
    return seen


def import_error(d: Drill) -> Seen:
    """A worker module that cannot be imported (a missing dependency): one JSON
    WORKER_CRASH line, exit 1; the queue it should serve is unserved."""
    seen = Seen()
    with d.conn() as conn:
        enqueue(
            conn,
            "q_escalation",
            build_envelope(
                entity_type="enforcement_case",
                entity_id="1",
                org_id="org-drill",
                idempotency_key="drill:import",
            ),
        )
    with tempfile.TemporaryDirectory(prefix="drill-import-") as tmp:
        staged = Path(tmp) / "psycopg_pool"
        staged.mkdir()
        (staged / "__init__.py").write_text('raise ImportError("No module named psycopg_pool (drill)")\n')
        started = time.monotonic()
        worker = d.spawn("backend.workers.escalation", PYTHONPATH=tmp)
        if worker.wait_exit(timeout=30) != 1:
            raise DrillFailed("an import error did not exit 1")
    if len(worker.lines) != 1 or not worker.named("WORKER_CRASH"):
        raise DrillFailed(f"expected one WORKER_CRASH line: {worker.tail(3)}")
    crash = worker.named("WORKER_CRASH")[0]
    seen.event = f"WORKER_CRASH error_type={crash['error_type']} ({crash['error']}) exit 1"
    d.await_reason("queue_unserved", "q_escalation", started, seen)
    return seen


def frozen_worker(d: Drill) -> Seen:
    """SIGSTOP mid-life: frozen, with the statement that ends it; running again, it says
    how long it stood still and is alive again."""
    seen = Seen()
    worker = d.spawn()
    worker_id = worker.wait_boot()["worker_id"]
    d.await_alive(worker_id)
    worker.send(signal.SIGSTOP)
    started = time.monotonic()
    try:
        reason = d.await_reason("frozen_worker", worker_id, started, seen)
        if f"pid {worker.pid}" not in reason["message"] or "pg_terminate_backend" not in reason["message"]:
            raise DrillFailed(f"frozen_worker does not name the pid and the way out: {reason['message']}")
    finally:
        worker.send(signal.SIGCONT)
    stalled = worker.wait_for("WORKER_STALLED", timeout=15)
    seen.event = f"after SIGCONT: WORKER_STALLED stalled_s={stalled['stalled_s']}"
    d.await_alive(worker_id)
    return seen


def stuck_claims(d: Drill) -> Seen:
    """An outbox worker killed while a receiver takes its time, and no other worker: its
    claim stays processing past its lease."""
    seen = Seen()
    with HttpRecorder() as receiver:
        receiver.reply(200, delay_s=30)
        with d.conn() as conn:
            enqueue(
                conn,
                "q_outbox_processor",
                build_envelope(
                    entity_type="notification",
                    entity_id="drill",
                    org_id="org-drill",
                    idempotency_key="drill:stuck",
                    payload={"channel": "webhook", "subject": "drill", "body": "a slow receiver"},
                ),
            )
        worker = d.spawn("backend.workers.outbox_processor", OUTBOX_WEBHOOK_URL=receiver.url_for("/hook"))
        worker.wait_boot()
        deadline = time.monotonic() + 20
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        if not receiver.requests:
            raise DrillFailed("the outbox never called the receiver")
        worker.send(signal.SIGKILL)
        worker.wait_exit(timeout=10)
        started = time.monotonic()
        seen.event = "none from the killed worker; the claim's lease runs out unextended"
        d.await_reason("stuck_claims", None, started, seen)
    return seen


DRILLS: dict[str, Callable[[Drill], Seen]] = {
    "config_crash_loop": config_crash_loop,
    "unreachable_database": unreachable_database,
    "kill_loop": kill_loop,
    "sigterm_every_few_seconds": sigterm_every_few_seconds,
    "import_error": import_error,
    "frozen_worker": frozen_worker,
    "stuck_claims": stuck_claims,
}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _connection(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def reset(url: str) -> None:
    """Empty the runtime's tables and the workers' queues: each drill starts clean."""
    with _connection(url) as conn:
        conn.execute(
            "TRUNCATE workers.heartbeats, workers.processed_jobs, workers.dead_letters, workers.deliveries"
        )
        for row in conn.execute("SELECT queue_name FROM pgmq.list_queues()").fetchall():
            conn.execute("SELECT pgmq.purge_queue(%s)", (row["queue_name"],))


def run_railway(url: str, names: list[str], pace_name: str) -> int:
    """The drills at the production settings (or the suite's short ones), with restarts."""
    from scripts import drills_railway

    pace = drills_railway.SHORT if pace_name == "short" else drills_railway.DEFAULTS
    results = []
    for name in names:
        reset(url)
        results.append(drills_railway.run_drill(url, name, pace))
        print(drills_railway.table(results[-1:]).splitlines()[-1], flush=True)
    print()
    print(drills_railway.table(results))
    return 0 if all(r.passed for r in results) else 1


def run(url: str, names: list[str]) -> int:
    failed = 0
    for name in names:
        reset(url)
        drill = Drill(url)
        try:
            seen = DRILLS[name](drill)
            print(f"PASS {name}")
            print(f"     event:     {seen.event}")
            print(
                f"     inspector: exit {seen.inspector_exit}, {seen.reason}"
                + (f" (after {seen.verdict_after_s} s)" if seen.verdict_after_s is not None else "")
            )
        except DrillFailed as exc:
            failed += 1
            print(f"FAIL {name}: {exc}")
        finally:
            drill.close()
        sys.stdout.flush()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.drills",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("drills", nargs="*", help=f"which drills (default: all): {', '.join(DRILLS)}")
    parser.add_argument("--url", help="a database to spare (its workers schema is emptied)")
    parser.add_argument(
        "--defaults",
        action="store_const",
        const="defaults",
        dest="pace",
        help="the restart drills at the production settings (30 s heartbeat and visibility timeout)",
    )
    parser.add_argument(
        "--short",
        action="store_const",
        const="short",
        dest="pace",
        help="the restart drills at the suite's pace",
    )
    args = parser.parse_args(argv)
    from scripts.drills_railway import RAILWAY_DRILLS

    known = RAILWAY_DRILLS if args.pace else DRILLS
    names = args.drills or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"no such drill: {', '.join(unknown)}")

    def drive(url: str) -> int:
        return run_railway(url, names, args.pace) if args.pace else run(url, names)

    if args.url:
        return drive(args.url)
    from backend.db.embedded import EmbeddedPostgres
    from backend.db.migrate import apply_migrations

    with tempfile.TemporaryDirectory(prefix="drills-") as tmp:
        server = EmbeddedPostgres(Path(tmp) / "pg")
        url = server.start()
        try:
            with _connection(url) as conn:
                apply_migrations(conn)
            return drive(url)
        finally:
            server.stop("immediate")


if __name__ == "__main__":
    os.environ.pop("SUPABASE_DB_URL", None)
    sys.exit(main())
