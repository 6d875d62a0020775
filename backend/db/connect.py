"""Connections: URL resolution (embedded in dev), the pool, and the reconnect policies."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
)

from backend.backoff import tenacity_wait
from backend.config import Settings
from backend.dburl import is_transaction_pooler, libpq_url
from backend.errors import describe
from backend.events import Event
from backend.logs import log_event

# A dead server is noticed within ~20 s even when the network drops silently.
# tcp_user_timeout covers a query in flight, which keepalives (idle only) do not.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
    "tcp_user_timeout": 15000,
}

# Errors that mean "the database is unavailable", not "this statement is wrong": a lost
# connection, a shutdown, and a server that went read-only (a failover to a standby, a
# full disk). They are retried; anything else from the runtime's own SQL is a crash.
DB_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
)


def resolve_db_url(settings: Settings) -> str:
    """The configured URL, or in dev without one the embedded server's (started on demand)."""
    if settings.db_url:
        return settings.db_url
    from backend.db.embedded import default_server
    from backend.db.migrate import apply_migrations, current_version, latest_version

    url = default_server().start()
    # The embedded default comes ready, whichever command starts it first (a reset server
    # included): schema, pgmq and queues, as the README promises.
    with psycopg.connect(url, autocommit=True) as conn:
        if current_version(conn) < latest_version():
            apply_migrations(conn)
    return url


def connect_kwargs(url: str, application_name: str) -> dict[str, Any]:
    """psycopg connection options: no prepared statements behind the transaction pooler."""
    kwargs: dict[str, Any] = {
        "application_name": application_name[:63],
        "connect_timeout": 5,
        "row_factory": dict_row,
    }
    if url.startswith(("postgres://", "postgresql://")) and "host=/" not in url:
        kwargs.update(_KEEPALIVES)
    if is_transaction_pooler(url):
        kwargs["prepare_threshold"] = None
    return kwargs


def connect(url: str, application_name: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """One connection, outside the pool (boot checks, migrations, tools)."""
    kwargs = connect_kwargs(url, application_name)
    try:
        return psycopg.connect(libpq_url(url), autocommit=autocommit, **kwargs)
    except psycopg.OperationalError as exc:
        # libpq says only "connection timeout expired": which server did not answer is
        # what the operator needs (a firewall, the IPv6-only direct host, a wrong port).
        if "timeout expired" not in str(exc):
            raise
        raise psycopg.OperationalError(
            f"{exc}: no answer from {endpoint(url)} within {kwargs['connect_timeout']} s"
        ) from exc


def endpoint(url: str) -> str:
    """``host:port`` of a URL or conninfo string, never its password."""
    try:
        info = conninfo_to_dict(libpq_url(url))
    except psycopg.Error:
        return "the server of SUPABASE_DB_URL"
    host = str(info.get("host") or info.get("hostaddr") or "localhost")
    return f"{host}:{info.get('port') or 5432}"


def _name_session(application_name: str) -> Callable[[psycopg.Connection[Any]], None]:
    """Name the server session after the worker, in SQL too: a session pooler may not pass
    the startup parameter on, and the inspector finds a worker's sessions by this name."""

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT set_config('application_name', %s, false)", (application_name[:63],))

    return configure


def make_pool(url: str, application_name: str, *, size: int = 3) -> ConnectionPool[Any]:
    """The worker's pool: the job loop, the housekeeping thread, and one spare."""
    kwargs = connect_kwargs(url, application_name)
    kwargs["autocommit"] = True
    return ConnectionPool(
        libpq_url(url),
        min_size=size,
        max_size=size,
        kwargs=kwargs,
        configure=None if is_transaction_pooler(url) else _name_session(application_name),
        open=False,
        check=ConnectionPool.check_connection,
        name=application_name,
        reconnect_timeout=3600.0,
    )


# What the server says when retrying cannot help, and what to do about it. libpq reports
# these at connection time without a SQLSTATE, so they are known by their text.
_PERMANENT = (
    (re.compile(r"password authentication failed"), "the password in SUPABASE_DB_URL is wrong"),
    (
        re.compile(r'role ".*" does not exist|Tenant or user not found'),
        "the user in SUPABASE_DB_URL does not exist (Supabase's pooler wants postgres.<project-ref>)",
    ),
    (re.compile(r'database ".*" does not exist'), "the database named in SUPABASE_DB_URL does not exist"),
    (re.compile(r"no pg_hba\.conf entry"), "the server does not accept this client, user or database"),
    (
        re.compile(r"server does not support SSL"),
        "the server does not accept TLS; in dev use sslmode=disable in SUPABASE_DB_URL",
    ),
)


def permanent_reason(exc: BaseException) -> str | None:
    """What to fix when a connection failure is one that retrying cannot cure, else None."""
    text = str(exc)
    for pattern, fix in _PERMANENT:
        match = pattern.search(text)
        if match:
            return f"{fix} ({match.group(0)})"
    return None


def boot_retrying(timeout_s: float, stopping: threading.Event) -> Retrying:
    """Bounded retries while booting: give up after ``timeout_s``, or at once when stopping."""
    return Retrying(
        stop=stop_after_delay(timeout_s) | stop_when_event_set(stopping),
        wait=tenacity_wait(base_s=0.2, max_s=2.0),
        sleep=_sleep_until_stopped(stopping),
        retry=retry_if_exception(lambda exc: isinstance(exc, DB_ERRORS) and permanent_reason(exc) is None),
        before_sleep=_log_retry(Event.DB_BOOT_RETRY),
        reraise=True,
    )


def outage_retrying(stopping: threading.Event, max_wait_s: float = 10.0) -> Retrying:
    """Retries while RUNNING: capped backoff with jitter, never giving up unless stopping.
    A stop request cuts the wait between attempts short."""
    return Retrying(
        stop=lambda _state: stopping.is_set(),
        wait=tenacity_wait(base_s=0.25, max_s=max_wait_s),
        sleep=_sleep_until_stopped(stopping),
        retry=retry_if_exception_type(DB_ERRORS),
        before_sleep=_log_retry(Event.DB_RETRY),
        reraise=True,
    )


def _sleep_until_stopped(stopping: threading.Event) -> Callable[[float], None]:
    def sleep(seconds: float) -> None:
        stopping.wait(seconds)

    return sleep


def _log_retry(event: Event) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log_event(
            event,
            {
                "attempt": state.attempt_number,
                "delay_s": round(delay, 3),
                "error": describe(exc),
                "error_type": type(exc).__name__,
            },
            logging.WARNING,
        )

    return before_sleep
