"""One real PostgreSQL (the embedded wheel) per test session, schema applied once,
state reset per test."""

from __future__ import annotations

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

TEST_DATA = PROJECT_ROOT / ".data" / "test"
RESET_SCHEMAS = ("workers", "dragonfly")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    pgdata = TEST_DATA / "pgdata"
    server = EmbeddedPostgres(pgdata)
    server.stop("immediate")
    if pgdata.exists():
        shutil.rmtree(pgdata)
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    server.start()
    yield server
    server.stop("immediate")


@pytest.fixture(scope="session")
def db_url(pg_server: EmbeddedPostgres) -> str:
    url = pg_server.start()
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn)
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
        for queue in QUEUES:
            conn.execute("SELECT pgmq.purge_queue(%s)", (queue,))
            conn.execute(f"TRUNCATE pgmq.a_{queue}")


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
