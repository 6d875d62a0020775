"""One real PostgreSQL (the embedded wheel) per test session, schema applied once,
state reset per test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from backend.config import QUEUES
from backend.db.embedded import PROJECT_ROOT, EmbeddedPostgres
from backend.db.migrate import apply_migrations
from scripts.harness.receivers import HttpRecorder
from scripts.harness.smtp import SmtpRecorder
from tests.workers.probe import SCHEMA_SQL as PROBE_SCHEMA

TEST_DATA = PROJECT_ROOT / ".data" / "test"
RESET_SCHEMAS = ("workers", "dragonfly", "probe")


def _remove_stale_servers() -> None:
    """Servers left by test sessions that died (their pid is gone) are stopped and deleted:
    the session's (``pg-<pid>``) and those its tests start of their own (``own-<pid>``)."""
    for folder in [*TEST_DATA.glob("pg-*"), *TEST_DATA.glob("own-*")]:
        suffix = folder.name.partition("-")[2]
        pid = int(suffix) if suffix.isdigit() else 0
        if pid and _alive(pid):
            continue
        EmbeddedPostgres(folder).stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """A fresh server for this test session only (sessions may run side by side)."""
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    _remove_stale_servers()
    pgdata = TEST_DATA / f"pg-{os.getpid()}"
    server = EmbeddedPostgres(pgdata)
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture(scope="session")
def db_url(pg_server: EmbeddedPostgres) -> str:
    url = pg_server.start()
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn, queues=(*QUEUES, "q_probe"))
        conn.execute(PROBE_SCHEMA)
    return url


def reset_database(url: str) -> None:
    """Empty every table of the runtime and the domain, and every queue."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT format('%%I.%%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname = ANY(%s) AND tablename <> 'schema_migrations'",
            (list(RESET_SCHEMAS),),
        ).fetchall()
        if tables:
            conn.execute(f"TRUNCATE {', '.join(t[0] for t in tables)} RESTART IDENTITY CASCADE")
        for (queue,) in conn.execute("SELECT queue_name FROM pgmq.list_queues()").fetchall():
            conn.execute("SELECT pgmq.purge_queue(%s)", (queue,))
            conn.execute(f'TRUNCATE pgmq."a_{queue}"')


@pytest.fixture
def clean_db(db_url: str) -> str:
    """The URL of a database whose tables and queues are empty."""
    reset_database(db_url)
    return db_url


@pytest.fixture
def db(clean_db: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection (dict rows) to the freshly reset database."""
    with psycopg.connect(clean_db, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture
def http() -> Iterator[HttpRecorder]:
    """A real local HTTP receiver that records every request (scripts/harness/receivers.py)."""
    with HttpRecorder() as recorder:
        yield recorder


@pytest.fixture
def smtp() -> Iterator[SmtpRecorder]:
    """A real local SMTP server that records every mail (scripts/harness/smtp.py)."""
    with SmtpRecorder() as recorder:
        yield recorder
