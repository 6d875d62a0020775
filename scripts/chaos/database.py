"""The run's database: the embedded server or ``--url``, made ready and emptied, the
producer's waves enqueued once each, and the queue depth the drain waits on."""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

from backend.db.embedded import EmbeddedPostgres
from backend.db.migrate import apply_migrations
from backend.enqueue import enqueue_many
from scripts.chaos.audit import Conn, install_audit, remove_audit
from scripts.chaos.options import PGDATA, QUEUES, SENTINEL_PASSWORD, Options, SetupError
from scripts.chaos.workload import Item
from scripts.harness.process import with_password

DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


def connect(url: str) -> Conn:
    return psycopg.connect(
        url, autocommit=True, row_factory=dict_row, connect_timeout=5, application_name="chaos"
    )


def reset_database(conn: Conn) -> None:
    """Empty the runtime's, the domain's and the audit's tables, and the three queues."""
    rows = conn.execute(
        "SELECT format('%%I.%%I', schemaname, tablename) AS name FROM pg_tables"
        " WHERE schemaname = ANY(%s) AND tablename <> 'schema_migrations'",
        (["workers", "dragonfly", "chaos"],),
    ).fetchall()
    conn.execute(f"TRUNCATE {', '.join(r['name'] for r in rows)} RESTART IDENTITY CASCADE")
    for queue in QUEUES:
        conn.execute("SELECT pgmq.purge_queue(%s)", (queue,))
        conn.execute(f'TRUNCATE pgmq."a_{queue}"')


def leftovers(conn: Conn) -> list[str]:
    """What makes this database unfit for a run: earlier state, or workers running on it."""
    depth = " + ".join(f'(SELECT count(*) FROM pgmq."q_{q}")' for q in QUEUES)
    row = conn.execute(
        "SELECT (SELECT count(*) FROM workers.processed_jobs) AS ledger_rows,"
        " (SELECT count(*) FROM workers.dead_letters) AS dead_letters,"
        " (SELECT count(*) FROM dragonfly.judgments) AS judgments,"
        f" {depth} AS queued_messages,"
        " (SELECT count(*) FROM workers.heartbeats WHERE status IN ('BOOTING', 'RUNNING', 'DRAINING')"
        "  AND last_heartbeat_at > clock_timestamp() - interval '5 seconds') AS live_workers"
    ).fetchone()
    assert row is not None
    return [f"{n} {name.replace('_', ' ')}" for name, n in row.items() if n]


def queued(conn: Conn) -> int:
    """Messages in the three queues, visible or not."""
    row = conn.execute(
        "SELECT " + " + ".join(f'(SELECT count(*) FROM pgmq."q_{q}")' for q in QUEUES) + " AS n"
    ).fetchone()
    return int(row["n"]) if row else 0


def enqueue_wave(conn: Conn, index: int, items: Sequence[Item]) -> bool:
    """Enqueue one wave in one transaction, once: a retry of a wave that committed does nothing."""
    with conn.transaction():
        if conn.execute("SELECT 1 FROM chaos.waves WHERE wave = %s", (index,)).fetchone():
            return False
        conn.execute("INSERT INTO chaos.waves (wave) VALUES (%s)", (index,))
        envelopes: dict[str, list[Any]] = defaultdict(list)
        for item in items:
            if item.key is None:  # malformed on purpose: enqueue_many would refuse it
                conn.execute("SELECT pgmq.send(%s, %s::jsonb, 0)", (item.queue, item.text))
            else:
                envelopes[item.queue].append(item.body)
        for queue, bodies in envelopes.items():
            enqueue_many(conn, queue, bodies)
    return True


@dataclass
class Database:
    """The database of the run, and the embedded server to restart (when there is one)."""

    url: str
    server: EmbeddedPostgres | None
    owned: bool

    @classmethod
    def open(cls, opts: Options) -> Database:
        if opts.url:
            server = EmbeddedPostgres(opts.pgdata) if opts.pgdata else None
            if server is not None and server.url() is None:
                raise SetupError(f"no PostgreSQL is running in {opts.pgdata}")
            return cls(url=opts.url, server=server, owned=False)
        if opts.pgdata:
            server = EmbeddedPostgres(opts.pgdata)
            return cls(url=server.start(), server=server, owned=False)
        server = EmbeddedPostgres(PGDATA)
        return cls(url=server.start(), server=server, owned=True)

    @property
    def worker_url(self) -> str:
        """The URL the workers get: with a sentinel password when the server trusts any."""
        if self.server is None or urlsplit(self.url).password:
            return self.url
        return with_password(self.url, SENTINEL_PASSWORD)

    @property
    def password(self) -> str | None:
        return urlsplit(self.worker_url).password or None

    def prepare(self, reset: bool) -> None:
        """Schema, queues and audit in place; the database empty (or emptied)."""
        with connect(self.url) as conn:
            apply_migrations(conn, queues=QUEUES)
            found = leftovers(conn)
            if any("live workers" in f for f in found):
                raise SetupError(
                    f"workers are running against this database ({', '.join(found)}); stop them first"
                )
            if found and not (reset or self.owned):
                raise SetupError(f"the database is not empty ({', '.join(found)}); pass --reset to empty it")
            if found or self.owned:
                reset_database(conn)
            install_audit(conn)

    def close(self) -> None:
        if self.owned and self.server is not None:
            self.server.stop("fast")  # the data stays in .data/chaos-pg for a look afterwards
            return
        try:
            with connect(self.url) as conn:
                remove_audit(conn)
        except psycopg.Error as exc:
            print(f"chaos: could not drop the chaos schema: {exc}", file=sys.stderr)
