"""Command line: the report (default), and ``dead-letters list``, ``replay`` and ``discard``.

Exit codes: 0 healthy (or the command did what was asked), 1 unhealthy (or a replay
failed), 2 bad usage, bad configuration, or the database cannot be reached or read. Every
failure is one line on stderr, without the password and without a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from backend.config import Settings, load_settings
from backend.db.connect import connect, resolve_db_url
from backend.dburl import redact_url, secrets_of
from backend.errors import ConfigError
from tools.worker_inspector import letters
from tools.worker_inspector.history import read_history
from tools.worker_inspector.html import render_html
from tools.worker_inspector.model import Options, duration
from tools.worker_inspector.render import emit, one_line, render_report
from tools.worker_inspector.report import build_report
from tools.worker_inspector.watch import watch

PROG = "python -m tools.worker_inspector"
APP_NAME = "dragonfly-inspector"
EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNUSABLE = 0, 1, 2
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MISSING_SCHEMA = (
    pg_errors.UndefinedTable,
    pg_errors.UndefinedFunction,
    pg_errors.InvalidSchemaName,
    pg_errors.UndefinedColumn,
)


class Unusable(Exception):
    """The inspector cannot do its job; the message is the one line the operator sees."""


def duration_arg(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h`` or ``7d`` as seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 24h or 7d")
    return float(match[1]) * _UNITS[match[2] or "s"]


def count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and its sub-parsers by name (to report their usage errors)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Health of the workers, queues, claims and dead letters of a database "
        "(SUPABASE_DB_URL; the embedded dev server when unset). Read-only, "
        "except dead-letters replay.",
        epilog="exit codes: 0 healthy, 1 unhealthy, 2 bad usage or cannot connect. "
        "See docs/WORKER_INSPECTOR.md.",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--stale-after",
        type=duration_arg,
        metavar="DURATION",
        help="heartbeat age that makes a worker stale (default 2 x WORKER_HEARTBEAT_INTERVAL_S = 60s)",
    )
    parser.add_argument(
        "--dead-after",
        type=duration_arg,
        metavar="DURATION",
        help="heartbeat age that makes a worker dead (default 3 x --stale-after = 180s)",
    )
    parser.add_argument(
        "--since",
        type=duration_arg,
        metavar="DURATION",
        default=86400.0,
        help="window of interest: stopped, crashed or dead workers last seen "
        "before it are hidden (counted) and do not affect the verdict "
        "(default 24h)",
    )
    parser.add_argument(
        "--max-age",
        type=duration_arg,
        metavar="DURATION",
        default=600.0,
        help="a queue whose oldest message is older is unhealthy (default 10m)",
    )
    parser.add_argument(
        "--all", action="store_true", dest="show_all", help="show every worker row, also the hidden history"
    )
    parser.add_argument(
        "--stuck-limit",
        type=count_arg,
        metavar="N",
        default=20,
        help="stuck claims listed (all are counted; default 20)",
    )
    parser.add_argument(
        "--timeout",
        type=duration_arg,
        metavar="DURATION",
        default=10.0,
        help="statement timeout of each query (default 10s)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    dead_letters = commands.add_parser("dead-letters", help="list, replay or discard dead letters")
    actions = dead_letters.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="list dead letters, newest first")
    listing.add_argument("--queue", metavar="Q", help="only this queue")
    listing.add_argument(
        "--limit", type=count_arg, metavar="N", default=50, help="letters listed (default 50)"
    )
    listing.add_argument(
        "--include-replayed", action="store_true", help="also letters already replayed or discarded"
    )
    listing.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="one JSON document, with each letter's message",
    )

    replay = actions.add_parser(
        "replay", help="re-send dead letters to their queue with a fresh attempt budget"
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, dest="letter_id", metavar="ID", help="one letter")
    which.add_argument("--queue", metavar="Q", help="with --all: every unreplayed letter of Q")
    replay.add_argument("--all", action="store_true", dest="replay_all", help="required with --queue")
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    replay.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON document")
    discard = actions.add_parser(
        "discard", help="close dead letters that need no replay; they are kept until retention"
    )
    which = discard.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id", type=int, dest="letter_ids", action="append", metavar="ID", help="a letter (repeatable)"
    )
    which.add_argument("--queue", metavar="Q", help="with --all: every open letter of Q")
    discard.add_argument("--all", action="store_true", dest="discard_all", help="required with --queue")
    discard.add_argument("--reason", default="", help="why, kept with the letter")
    discard.add_argument("--dry-run", action="store_true", help="say what would be discarded")
    discard.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON document")
    live = commands.add_parser(
        "watch", help="the report, refreshed like top (q quits); plain repeated text through a pipe"
    )
    live.add_argument(
        "--every", type=duration_arg, metavar="DURATION", default=2.0, help="refresh interval (default 2s)"
    )
    html_report = commands.add_parser(
        "report", help="write one self-contained HTML file: charts of the history and the verdict"
    )
    html_report.add_argument("--html", required=True, metavar="FILE", help="where to write it")
    html_report.add_argument(
        "--since",
        type=duration_arg,
        metavar="DURATION",
        dest="history_s",
        default=86400.0,
        help="how far back the charts go (default 24h)",
    )
    return parser, {
        "dead-letters": dead_letters,
        "list": listing,
        "replay": replay,
        "discard": discard,
        "report": html_report,
        "watch": live,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and cross-check the options; usage errors exit 2 with the usage."""
    parser, subs = build_parser()
    args = parser.parse_args(argv)
    if args.command == "dead-letters" and args.action == "replay":
        if args.queue is not None and not args.replay_all:
            subs["replay"].error("--queue replays every unreplayed letter of the queue: add --all to confirm")
        if args.letter_id is not None and args.replay_all:
            subs["replay"].error("--all goes with --queue, not --id")
    if args.command == "dead-letters" and args.action == "discard":
        if args.queue is not None and not args.discard_all:
            subs["discard"].error("--queue discards every open letter of the queue: add --all to confirm")
        if args.letter_ids and args.discard_all:
            subs["discard"].error("--all goes with --queue, not --id")
    if args.stale_after is not None and args.dead_after is not None and args.dead_after <= args.stale_after:
        parser.error("--dead-after must be longer than --stale-after")
    return args


def report_options(args: argparse.Namespace, settings: Settings) -> Options:
    stale = args.stale_after or 2 * settings.heartbeat_interval_s
    dead = args.dead_after or 3 * stale
    if dead <= stale:
        raise Unusable(f"--dead-after ({dead:g}s) must be longer than --stale-after ({stale:g}s)")
    return Options(
        stale_after_s=stale,
        dead_after_s=dead,
        since_s=args.since,
        max_age_s=args.max_age,
        show_all=args.show_all,
        stuck_limit=args.stuck_limit,
        statement_timeout_s=args.timeout,
    )


def _dispatch(conn: Any, args: argparse.Namespace, options: Options, safe: str) -> int:
    """Run the command asked for on an open connection; its exit code."""
    if args.command is None:
        report = build_report(conn, options, database=safe)
        emit(args, report.to_json(), render_report(report))
        return EXIT_HEALTHY if report.healthy else EXIT_UNHEALTHY
    if args.command == "report":
        return write_html_report(conn, options, args, database=safe)
    if args.command == "watch":
        return watch(lambda: build_report(conn, options, database=safe), args.every)
    if args.action == "list":
        return letters.list_letters(conn, args)
    if args.action == "discard":
        return letters.discard_letters(conn, args)
    return letters.replay_letters(conn, args)


def write_html_report(conn: Any, options: Options, args: argparse.Namespace, *, database: str) -> int:
    """Write the HTML report; the exit code is the verdict's, as for the text report."""
    report = build_report(conn, options, database=database)
    history = read_history(conn, args.history_s, statement_timeout_s=max(options.statement_timeout_s, 30))
    path = Path(args.html)
    path.write_text(render_html(report, history), encoding="utf-8")
    print(f"{path}: {report.verdict}, the last {duration(args.history_s)} ({path.stat().st_size:,} bytes)")
    return EXIT_HEALTHY if report.healthy else EXIT_UNHEALTHY


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except Unusable as exc:
        print(f"worker_inspector: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("worker_inspector: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (head, less) went away: nothing left to tell anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_UNHEALTHY


def _run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(lenient=True)
    except ConfigError as exc:
        raise Unusable(f"configuration error: {exc}") from None
    for warning in settings.warnings:
        print(f"worker_inspector: warning: {warning}", file=sys.stderr)
    options = report_options(args, settings)
    try:
        url = resolve_db_url(settings)
    except ConfigError as exc:
        raise Unusable(f"configuration error: {exc}") from None
    except (OSError, RuntimeError, subprocess.SubprocessError, psycopg.Error) as exc:
        raise Unusable(f"cannot start the embedded PostgreSQL: {one_line(exc)}") from None
    safe = redact_url(url)
    secret = secrets_of(url)
    try:
        conn = connect(url, APP_NAME)
    except psycopg.Error as exc:
        raise Unusable(f"cannot connect to {safe}: {one_line(exc, secret)}") from None
    with conn:
        try:
            return _dispatch(conn, args, options, safe)
        except _MISSING_SCHEMA as exc:
            raise Unusable(
                f"{safe} lacks the workers schema or pgmq ({one_line(exc, secret)}); "
                "run python -m backend.db.migrate"
            ) from None
        except psycopg.Error as exc:
            raise Unusable(f"query failed on {safe}: {one_line(exc, secret)}") from None
