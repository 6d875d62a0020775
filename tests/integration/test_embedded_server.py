"""The embedded dev server as clients outside this project see it: an ordinary TCP URL, and
pgmq as an extension that a client may create itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from pgmq import PGMQueue
from pgmq.install import get_embedded_sql_version, install_pgmq_from_sql
from psycopg.rows import dict_row

from backend.db.embedded import PROJECT_ROOT, EmbeddedPostgres, _wheel, pgmq_layout
from backend.db.install import ensure_pgmq
from tests.conftest import TEST_DATA
from tests.helpers import one


@pytest.fixture
def other_db(db: psycopg.Connection[Any], clean_db: str) -> Iterator[str]:
    """The URL of an empty database of its own on the test server (no pgmq in it)."""
    db.execute("DROP DATABASE IF EXISTS embedded_clients WITH (FORCE)")
    db.execute("CREATE DATABASE embedded_clients")
    try:
        yield urlunsplit(urlsplit(clean_db)._replace(path="/embedded_clients"))
    finally:
        db.execute("DROP DATABASE embedded_clients WITH (FORCE)")


def _cli(action: str, data: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SUPABASE_DB_URL"}
    return subprocess.run(
        [sys.executable, "-m", "backend.db.embedded", action],
        env={**env, "DRAGONFLY_DATA_DIR": str(data)},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_migrations_install_pgmq_as_the_extension(db: psycopg.Connection[Any]) -> None:
    assert one(db, "SELECT extversion FROM pg_extension WHERE extname = 'pgmq'") == get_embedded_sql_version()


def test_a_client_creates_the_extension_itself(other_db: str) -> None:
    with psycopg.connect(other_db, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        conn.execute("SELECT pgmq.create('q_client')")
        conn.execute("""SELECT pgmq.send('q_client', '{"n": 1}')""")
        row = conn.execute("SELECT message FROM pgmq.read('q_client', 30, 1)").fetchone()
        assert row == ({"n": 1},)
        assert ensure_pgmq(conn) == "present"


def test_the_pypi_client_sends_and_reads_through_the_printed_url(
    pg_server: EmbeddedPostgres, clean_db: str, tmp_path: Path
) -> None:
    (tmp_path / "pgdata").symlink_to(pg_server.pgdata)  # `status` of the test server
    status = _cli("status", tmp_path)
    assert status.returncode == 0, status.stderr
    url = status.stdout.splitlines()[0].removeprefix("running at ")
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.query) == ("postgresql", "127.0.0.1", "")
    assert parts.password is None  # nothing secret is printed
    assert "pgmq: extension" in status.stdout

    client = PGMQueue(conn_string=url)  # it runs CREATE EXTENSION IF NOT EXISTS pgmq first
    try:
        client.create_queue("pypi_client")
        msg_id = client.send("pypi_client", {"hello": "dev"})
        message = client.read("pypi_client", vt=30)
        assert message is not None and not isinstance(message, list)
        assert (message.msg_id, message.message) == (msg_id, {"hello": "dev"})
    finally:
        client.drop_queue("pypi_client")
        client.close()


def test_loose_sql_pgmq_of_an_older_checkout_is_detected_and_left(other_db: str) -> None:
    with psycopg.connect(other_db) as conn:
        install_pgmq_from_sql(conn=conn)
        conn.commit()
        conn.autocommit = True
        assert ensure_pgmq(conn) == "present"
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pgmq'").fetchone() == (0,)
    assert pgmq_layout(other_db).startswith("loose SQL")


@pytest.fixture
def own_pgdata() -> Iterator[Path]:
    """A data folder for a server of the test's own, stopped and deleted afterwards."""
    pgdata = TEST_DATA / f"own-{os.getpid()}"
    shutil.rmtree(pgdata, ignore_errors=True)
    try:
        yield pgdata
    finally:
        EmbeddedPostgres(pgdata).stop("immediate")
        shutil.rmtree(pgdata, ignore_errors=True)


def test_a_server_of_the_unix_socket_layout_keeps_working_until_restarted(own_pgdata: Path) -> None:
    own_pgdata.mkdir(parents=True)
    _wheel().get_server(own_pgdata, cleanup_mode=None)  # as the earlier checkout started it
    server = EmbeddedPostgres(own_pgdata)
    socket_url = server.start()
    assert "host=/" in socket_url
    with psycopg.connect(socket_url, row_factory=dict_row) as conn:
        assert one(conn, "SELECT 1") == 1

    server.stop()
    tcp_url = server.start()
    assert urlsplit(tcp_url).hostname == "127.0.0.1"
    with psycopg.connect(tcp_url, row_factory=dict_row) as conn:
        assert one(conn, "SELECT current_setting('listen_addresses')") == "127.0.0.1"
    server.stop("immediate")
    assert server.start() == tcp_url  # the port is kept across restarts


def test_processes_starting_a_new_server_together_share_one(own_pgdata: Path, tmp_path: Path) -> None:
    (tmp_path / "pgdata").symlink_to(own_pgdata)
    own_pgdata.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SUPABASE_DB_URL"}
    starts = [
        subprocess.Popen(
            [sys.executable, "-m", "backend.db.embedded", "start"],
            env={**env, "DRAGONFLY_DATA_DIR": str(tmp_path)},
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=60) for p in starts]
    assert [p.returncode for p in starts] == [0, 0, 0], [err for _, err in results]
    assert len({out for out, _ in results}) == 1
