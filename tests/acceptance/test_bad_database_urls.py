"""A malformed or refused ``SUPABASE_DB_URL``, against every command that reads it: one
clear line naming the variable and the fix, the stated exit code, no traceback, and no
part of the password in any output stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from backend.db.embedded import PROJECT_ROOT

# (URL, the password in it, what the one line must say)
BAD_URLS = [
    (
        "postgresql://postgres:[Sup3rSecretPw]@db.example.supabase.co:5432/postgres",
        "Sup3rSecretPw",
        "remove the brackets",
    ),
    ("postgresql://postgres:Zebra@Hunter2x@db.example.supabase.co:5432/postgres", "Zebra@Hunter2x", "%40"),
    ("postgresql://postgres:Hunter2%zz@db.example.supabase.co:5432/postgres", "Hunter2%zz", "%25"),
    ("postgresql://postgres:pa#ssW0rd99@db.example.supabase.co:5432/postgres", "pa#ssW0rd99", "%23"),
]
# (command, exit code on a configuration error)
COMMANDS = [
    (["-m", "backend.workers.collectability"], 1),
    (["-m", "backend.db.migrate"], 1),
    (["-m", "tools.worker_inspector"], 2),
    (
        [
            "-m",
            "backend.enqueue",
            "q_collectability",
            "--entity-type",
            "judgment",
            "--entity-id",
            "1",
            "--org-id",
            "o",
        ],
        1,
    ),
    (["-m", "backend.db.embedded", "status"], 1),
]


def run(args: list[str], url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "WORKER_"))}
    env.update({"SUPABASE_MODE": "prod", "SUPABASE_DB_URL": url, "WORKER_BOOT_TIMEOUT_S": "20"})
    return subprocess.run(
        [sys.executable, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def leaked(output: str, password: str) -> list[str]:
    """Every piece of the password (4 characters or more) found in ``output``."""
    pieces = {password[i : i + 4] for i in range(len(password) - 3)}
    return sorted(p for p in pieces if p in output)


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines), lines
    return lines


@pytest.mark.parametrize(("url", "password", "fix"), BAD_URLS, ids=["brackets", "at", "percent", "hash"])
@pytest.mark.parametrize(
    ("command", "code"), COMMANDS, ids=["worker", "migrate", "inspector", "enqueue", "embedded"]
)
def test_a_malformed_url_is_one_line_with_the_fix_and_no_password(
    url: str, password: str, fix: str, command: list[str], code: int
) -> None:
    done = run(command, url)
    assert done.returncode == code, done.stdout + done.stderr
    lines = error_lines(done)
    assert leaked(done.stdout + done.stderr, password) == []
    if command[1].startswith("backend.workers."):
        events = [json.loads(line) for line in lines]
        assert [e["event"] for e in events] == ["WORKER_BOOT", "WORKER_CRASH"]
        assert all("SUPABASE_DB_URL" in e["data"]["error"] and fix in e["data"]["error"] for e in events)
        assert events[1]["data"]["variable"] == "SUPABASE_DB_URL" and events[1]["data"]["traceback"] == ""
    else:
        assert len(lines) == 1, lines
        assert "SUPABASE_DB_URL" in lines[0] and fix in lines[0], lines[0]


def with_user(url: str, user: str, password: str = "NotTheRightPw9") -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_a_missing_role_fails_the_boot_at_once_with_the_fix(db_url: str) -> None:
    url = with_user(db_url, "no_such_role")
    started = time.monotonic()
    done = run(["-m", "backend.workers.collectability"], url)
    took = time.monotonic() - started
    assert done.returncode == 1 and took < 5, (took, done.stdout)
    events = [json.loads(line) for line in error_lines(done)]
    assert [e["event"] for e in events] == ["WORKER_BOOT", "WORKER_CRASH"], events
    crash = events[1]["data"]
    assert crash["error_type"] == "BootError" and crash["traceback"] == ""
    assert "the user in SUPABASE_DB_URL does not exist" in crash["error"]
    assert leaked(done.stdout + done.stderr, "NotTheRightPw9") == []


def test_pgbouncer_true_is_understood_not_passed_to_libpq(db_url: str) -> None:
    parts = urlsplit(db_url)
    url = urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, "pgbouncer=true"]))))
    done = run(["-m", "tools.worker_inspector", "--json"], url)
    assert done.returncode in (0, 1), done.stderr  # a report, healthy or not; 2 is unusable
    assert json.loads(done.stdout)["verdict"] in ("healthy", "unhealthy")


def test_a_wrong_password_fails_the_boot_at_once_with_the_fix(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as admin:
        hba = Path(admin.execute("SHOW hba_file").fetchone()[0])
        before = hba.read_text()
        admin.execute("DROP ROLE IF EXISTS pw_check")
        admin.execute("CREATE ROLE pw_check LOGIN PASSWORD 'TheRightPw7'")
        # Only this role must prove its password; every other login stays as it was.
        hba.write_text("local all pw_check scram-sha-256\nhost all pw_check all scram-sha-256\n" + before)
        admin.execute("SELECT pg_reload_conf()")
        try:
            started = time.monotonic()
            done = run(
                ["-m", "backend.workers.collectability"], with_user(db_url, "pw_check", "Wr0ngPw-4242")
            )
            took = time.monotonic() - started
        finally:
            hba.write_text(before)
            admin.execute("SELECT pg_reload_conf()")
            admin.execute("DROP ROLE pw_check")
    assert done.returncode == 1 and took < 5, (took, done.stdout)
    events = [json.loads(line) for line in error_lines(done)]
    assert [e["event"] for e in events] == ["WORKER_BOOT", "WORKER_CRASH"], events
    assert "the password in SUPABASE_DB_URL is wrong" in events[1]["data"]["error"]
    assert leaked(done.stdout + done.stderr, "Wr0ngPw-4242") == []
