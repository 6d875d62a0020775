"""The main job, end to end, on the embedded default.

Seeds judgments and enforcement cases, enqueues work for all three workers, runs them as
real processes (the outbox delivering to a local webhook receiver started here) until the
queues are empty, stops them with SIGTERM and shows what happened.

    python -m scripts.demo [--judgments 60] [--cases 20] [--timeout 90] [--worker-role]

``--worker-role`` runs the workers as a login role that is a member of the least-privilege
``dragonfly_worker`` role (created by migrate), in prod mode, as on Railway; the demo's own
connection (seed, enqueue, report) stays the owner's.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from backend.config import QUEUES, WORKER_NAMES, load_settings
from backend.db.connect import resolve_db_url
from backend.db.migrate import WORKER_ROLE, apply_migrations
from backend.domain.seed import seed_demo
from backend.enqueue import build_envelope, enqueue_many
from scripts.harness.process import WorkerProcess, with_password
from scripts.harness.receivers import HttpRecorder

ROOT = Path(__file__).resolve().parents[1]


def depth(conn: psycopg.Connection[Any]) -> dict[str, int]:
    return {q: _count(conn, f"SELECT count(*) AS n FROM pgmq.q_{q}") for q in QUEUES}


def _count(conn: psycopg.Connection[Any], statement: str, params: tuple[Any, ...] = ()) -> int:
    row = conn.execute(statement, params).fetchone()
    assert row is not None  # a count always has its row
    return int(row["n"])


def start_workers(env: dict[str, str], logs: Path) -> dict[str, WorkerProcess]:
    """The three workers, each printing to its log file in ``logs``."""
    logs.mkdir(parents=True, exist_ok=True)
    return {
        name: WorkerProcess(f"backend.workers.{name}", env, log_path=logs / f"{name}.log")
        for name in WORKER_NAMES
    }


DEMO_LOGIN = "dragonfly_demo_worker"


def worker_login(conn: psycopg.Connection[Any], url: str) -> str:
    """A login role in the workers' least-privilege role, with a fresh password; its URL."""
    password = secrets.token_urlsafe(18)
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DEMO_LOGIN,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    conn.execute(f"{verb} ROLE {DEMO_LOGIN} LOGIN PASSWORD '{password}'")
    conn.execute(f"GRANT {WORKER_ROLE} TO {DEMO_LOGIN}")
    return with_password(url, password, user=DEMO_LOGIN)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--judgments", type=int, default=60)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument(
        "--worker-role", action="store_true", help=f"run the workers as a member of {WORKER_ROLE}"
    )
    args = parser.parse_args()

    settings = load_settings()
    print(f"mode {settings.mode}; database: {settings.safe_db_url or 'embedded (.data/pgdata)'}")
    url = resolve_db_url(settings)
    receiver = HttpRecorder().start()
    webhook = receiver.url_for("/dragonfly")
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        apply_migrations(conn)
        seeded = seed_demo(conn, judgments=args.judgments, cases=args.cases, seed=int(time.time()))
        run = f"demo-{int(time.time())}"
        org = seeded["org_id"]
        enqueue_many(
            conn,
            "q_collectability",
            [
                build_envelope(
                    entity_type="judgment", entity_id=str(j), org_id=org, idempotency_key=f"{run}:score:{j}"
                )
                for j in seeded["judgment_ids"]
            ],
        )
        enqueue_many(
            conn,
            "q_escalation",
            [
                build_envelope(
                    entity_type="enforcement_case",
                    entity_id=str(c),
                    org_id=org,
                    idempotency_key=f"{run}:escalate:{c}",
                )
                for c in seeded["case_ids"]
            ],
        )
        enqueue_many(
            conn,
            "q_outbox_processor",
            [
                build_envelope(
                    entity_type="notification",
                    entity_id="welcome",
                    org_id=org,
                    idempotency_key=f"{run}:welcome",
                    payload={
                        "channel": "webhook",
                        "subject": "Demo started",
                        "body": f"{len(seeded['judgment_ids'])} judgments seeded",
                    },
                )
            ],
        )
        print(
            f"seeded {len(seeded['judgment_ids'])} judgments and {len(seeded['case_ids'])} cases;"
            f" queued {depth(conn)}"
        )

        env = {
            **os.environ,
            "SUPABASE_MODE": settings.mode,
            "OUTBOX_WEBHOOK_URL": webhook,
            "PYTHONUNBUFFERED": "1",
        }
        if args.worker_role:
            env.update(SUPABASE_MODE="prod", SUPABASE_DB_URL=worker_login(conn, url))
            print(f"workers run as {DEMO_LOGIN}, a member of {WORKER_ROLE}")
        logs = ROOT / ".data" / "demo-logs" / run
        procs = start_workers(env, logs)
        started = time.monotonic()
        while any(depth(conn).values()):
            if time.monotonic() - started > args.timeout:
                print(f"queues not empty after {args.timeout:.0f} s: {depth(conn)}")
                break
            if any(p.proc.poll() is not None for p in procs.values()):
                print("a worker exited early; see its log in", logs)
                break
            time.sleep(0.2)
        took = time.monotonic() - started
        for proc in procs.values():
            if proc.proc.poll() is None:
                proc.send(signal.SIGTERM)
        codes = {name: proc.wait_exit(timeout=30) for name, proc in procs.items()}

        print(f"\nqueues empty after {took:.1f} s; workers stopped with SIGTERM\n")
        print(f"{'worker':<18} {'exit':>4} {'jobs done':>9} {'failed':>6}  log")
        for name in WORKER_NAMES:
            shutdown = procs[name].named("WORKER_SHUTDOWN")
            done = shutdown[-1]["jobs_processed"] if shutdown else "?"
            failed = shutdown[-1]["jobs_failed"] if shutdown else "?"
            print(f"{name:<18} {codes[name]:>4} {done:>9} {failed:>6}  {logs / (name + '.log')}")
        tiers = conn.execute(
            "SELECT tier, count(*) AS n, round(avg(score)) AS avg FROM"
            " dragonfly.collectability_scores WHERE job_key LIKE %s GROUP BY tier"
            " ORDER BY tier",
            (f"{run}:%",),
        ).fetchall()
        print("\ncollectability: " + ", ".join(f"tier {t['tier']}: {t['n']} (avg {t['avg']})" for t in tiers))
        actions = conn.execute(
            "SELECT details->>'action' AS action, count(*) AS n FROM"
            " dragonfly.enforcement_events WHERE job_key LIKE %s"
            " GROUP BY 1 ORDER BY 2 DESC",
            (f"{run}:%",),
        ).fetchall()
        print("escalation: " + ", ".join(f"{a['action']}: {a['n']}" for a in actions))
        delivered = {k: n for k, n in receiver.key_counts().items() if k.startswith(run)}
        print(
            f"outbox: {len(delivered)} webhook deliveries received at {webhook}"
            f" ({sum(delivered.values())} calls)"
        )
        ledger = conn.execute(
            "SELECT status, count(*) AS n FROM workers.processed_jobs WHERE"
            " job_key LIKE %s GROUP BY 1 ORDER BY 1",
            (f"{run}:%",),
        ).fetchall()
        print("ledger: " + ", ".join(f"{r['status']}: {r['n']}" for r in ledger))
        dead = _count(
            conn, "SELECT count(*) AS n FROM workers.dead_letters WHERE job_key LIKE %s", (f"{run}:%",)
        )
        print(f"dead letters: {dead}")
    receiver.stop()
    ok = all(code == 0 for code in codes.values()) and took <= args.timeout
    print(
        "\nthe data stays in .data/pgdata; next, in a shell:\n"
        "  . .venv/bin/activate && python -m tools.worker_inspector\n"
        "  . .venv/bin/activate && python -m backend.db.embedded reset"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
