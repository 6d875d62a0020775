"""``SUPABASE_DB_URL``: checked before anything connects, and never printed with its password.

Supabase's URL template (``postgresql://postgres:[YOUR-PASSWORD]@host:5432/postgres``) is
easy to get wrong: brackets kept around the password, or a password with ``@``, ``#``,
``/``, ``?`` or ``%`` pasted without percent-encoding. Python's URL parser and libpq read
such URLs differently, and their errors quote the password; so the URL is taken apart here
without either of them, and a malformed one is refused with the fix, the password never
echoed. Every function here accepts any text and never raises on it, except
``check_db_url``, whose errors are ``ConfigError`` naming the variable.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from backend.errors import ConfigError

VARIABLE = "SUPABASE_DB_URL"
TRANSACTION_POOLER_PORT = 6543
_LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})
_WEAK_SSLMODES = frozenset({"disable", "allow", "prefer"})
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Query parameters libpq does not know but Supabase's own URLs carry: understood here,
# never passed on (libpq refuses unknown parameters).
_OUR_PARAMETERS = ("pgbouncer",)


def _userinfo(url: str) -> tuple[str, str]:
    """(userinfo, the rest after it), read as people write them: up to the last ``@``."""
    _, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return "", rest
    userinfo, _, after = rest.rpartition("@")
    return userinfo, after


def url_password(url: str | None) -> str | None:
    """The password as written in the URL (None when there is none)."""
    if not url:
        return None
    userinfo, _ = _userinfo(url)
    _, sep, password = userinfo.partition(":")
    return password if sep and password else None


def secrets_of(url: str | None) -> list[str]:
    """Every form of the URL's password that could appear in output: as written and decoded."""
    password = url_password(url)
    if not password:
        return []
    return sorted({password, unquote(password)} - {""}, key=len, reverse=True)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    userinfo, after = _userinfo(url)
    user, sep, password = userinfo.partition(":")
    if not sep or not password:
        return url
    scheme = url.partition("://")[0]
    return f"{scheme}://{user}:***@{after}"


def is_transaction_pooler(url: str) -> bool:
    """Supabase's transaction pooler (port 6543, or ``pgbouncer=true``) breaks prepared
    statements and LISTEN."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    query = dict(parse_qsl(parts.query))
    return port == TRANSACTION_POOLER_PORT or query.get("pgbouncer", "").lower() == "true"


def libpq_url(url: str) -> str:
    """The URL as libpq takes it: without the parameters only this code understands."""
    if not any(f"{name}=" in url for name in _OUR_PARAMETERS):
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _OUR_PARAMETERS]
    return urlunsplit(parts._replace(query=urlencode(query)))


def check_db_url(url: str, *, prod: bool) -> str:
    """The URL to use, or ``ConfigError`` saying what is wrong and how to fix it.

    In prod, a remote host gets ``sslmode=require`` unless the URL asks for more."""
    scheme = url.partition("://")[0]
    if scheme not in ("postgres", "postgresql") or "://" not in url:
        raise ConfigError(VARIABLE, "must be a postgresql:// URL (postgresql://user:password@host:port/db)")
    userinfo, _ = _userinfo(url)
    _check_userinfo(userinfo)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ConfigError(
            VARIABLE, "the host or port is malformed; it must be host:port, e.g. host:5432"
        ) from None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if query.get("pgbouncer", "true").lower() not in ("true", "false"):
        raise ConfigError(VARIABLE, "pgbouncer= must be true or false")
    host = parts.hostname or query.get("host", "")
    if prod and not (host in _LOCAL_HOSTS or host.startswith("/")):
        sslmode = query.get("sslmode")
        if sslmode is None:
            query["sslmode"] = "require"
            return urlunsplit(parts._replace(query=urlencode(query)))
        if sslmode in _WEAK_SSLMODES:
            raise ConfigError(
                VARIABLE, f"sslmode={sslmode} is not allowed in prod; use require, verify-ca or verify-full"
            )
    return url


def _check_userinfo(userinfo: str) -> None:
    """Refuse what libpq and Python would read differently; the messages never quote it."""
    if "[" in userinfo or "]" in userinfo:
        raise ConfigError(
            VARIABLE,
            "the password is still inside the template's brackets ([YOUR-PASSWORD]):"
            " remove the brackets and keep the password",
        )
    for char, code in (("@", "%40"), ("#", "%23"), ("/", "%2F"), ("?", "%3F")):
        if char in userinfo:
            raise ConfigError(
                VARIABLE, f"the user or password contains {char!r}: percent-encode it as {code}"
            )
    if _BAD_ESCAPE.search(userinfo):
        raise ConfigError(
            VARIABLE,
            "the user or password has a '%' that is not a %XX escape: percent-encode it as %25",
        )
