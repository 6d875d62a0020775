"""The outbox's configuration: the ``OUTBOX_*`` variables, read and checked at boot."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Literal, get_args
from urllib.parse import urlsplit

from backend.errors import ConfigError

Channel = Literal["webhook", "slack", "discord", "email"]
TlsMode = Literal["starttls", "ssl", "none"]
CHANNELS: tuple[Channel, ...] = get_args(Channel)
TLS_MODES: tuple[TlsMode, ...] = get_args(TlsMode)

DEFAULT_SMTP_PORT = 587
DEFAULT_SMTPS_PORT = 465
DEFAULT_TIMEOUT_S = 10.0
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

OUTBOX_VARIABLES: tuple[tuple[str, str | None, str], ...] = (
    (
        "OUTBOX_WEBHOOK_URL",
        None,
        "http(s) URL that receives the JSON of `webhook` messages; unset: channel disabled",
    ),
    (
        "OUTBOX_SLACK_WEBHOOK_URL",
        None,
        "Slack incoming-webhook URL for `slack` messages; unset: channel disabled",
    ),
    (
        "OUTBOX_DISCORD_WEBHOOK_URL",
        None,
        "Discord webhook URL for `discord` messages; unset: channel disabled",
    ),
    ("OUTBOX_SMTP_HOST", None, "SMTP server for `email` messages; unset: channel disabled"),
    (
        "OUTBOX_SMTP_PORT",
        str(DEFAULT_SMTP_PORT),
        f"SMTP port; {DEFAULT_SMTPS_PORT} when unset and OUTBOX_SMTP_TLS=ssl",
    ),
    ("OUTBOX_SMTP_USERNAME", None, "SMTP login; unset: no AUTH"),
    ("OUTBOX_SMTP_PASSWORD", None, "SMTP password; required with OUTBOX_SMTP_USERNAME"),
    ("OUTBOX_SMTP_FROM", None, "sender address; required with OUTBOX_SMTP_HOST"),
    (
        "OUTBOX_SMTP_TLS",
        "starttls",
        "starttls, ssl (implicit TLS) or none (only without a login, or to a local host)",
    ),
    ("OUTBOX_HTTP_TIMEOUT_S", str(DEFAULT_TIMEOUT_S), "seconds before a webhook call is retried"),
    ("OUTBOX_SMTP_TIMEOUT_S", str(DEFAULT_TIMEOUT_S), "seconds before an SMTP exchange is retried"),
)

URL_VARIABLES: Mapping[Channel, str] = {
    "webhook": "OUTBOX_WEBHOOK_URL",
    "slack": "OUTBOX_SLACK_WEBHOOK_URL",
    "discord": "OUTBOX_DISCORD_WEBHOOK_URL",
}


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    """Where each channel delivers; secrets and token-bearing URLs stay out of ``repr``."""

    webhook_url: str | None = field(default=None, repr=False)
    slack_webhook_url: str | None = field(default=None, repr=False)
    discord_webhook_url: str | None = field(default=None, repr=False)
    smtp_host: str | None = None
    smtp_port: int = DEFAULT_SMTP_PORT
    smtp_username: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_from: str | None = None
    smtp_tls: TlsMode = "starttls"
    http_timeout_s: float = DEFAULT_TIMEOUT_S
    smtp_timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> OutboxConfig:
        """Read the ``OUTBOX_*`` variables; raise ``ConfigError`` naming the bad one."""
        tls = _tls_mode(environ)
        config = cls(
            webhook_url=_http_url(environ, "OUTBOX_WEBHOOK_URL"),
            slack_webhook_url=_http_url(environ, "OUTBOX_SLACK_WEBHOOK_URL"),
            discord_webhook_url=_http_url(environ, "OUTBOX_DISCORD_WEBHOOK_URL"),
            smtp_host=_text(environ, "OUTBOX_SMTP_HOST"),
            smtp_port=_port(environ, DEFAULT_SMTPS_PORT if tls == "ssl" else DEFAULT_SMTP_PORT),
            smtp_username=_text(environ, "OUTBOX_SMTP_USERNAME"),
            smtp_password=environ.get("OUTBOX_SMTP_PASSWORD") or None,
            smtp_from=_text(environ, "OUTBOX_SMTP_FROM"),
            smtp_tls=tls,
            http_timeout_s=_seconds(environ, "OUTBOX_HTTP_TIMEOUT_S"),
            smtp_timeout_s=_seconds(environ, "OUTBOX_SMTP_TIMEOUT_S"),
        )
        config._check_smtp()
        return config

    @property
    def channels(self) -> tuple[Channel, ...]:
        """The channels that have a destination."""
        return tuple(c for c in CHANNELS if self.is_configured(c))

    def describe(self) -> dict[str, str]:
        """Each configured channel and its destination, safe to log."""
        return {c: self.safe_destination(c) for c in self.channels}

    def is_configured(self, channel: Channel) -> bool:
        """Whether ``channel`` has a destination."""
        if channel == "email":
            return self.smtp_host is not None and self.smtp_from is not None
        return self.url_for(channel) is not None

    def url_for(self, channel: Channel) -> str | None:
        """The full URL (with its token) of an HTTP channel; never log it."""
        return {
            "webhook": self.webhook_url,
            "slack": self.slack_webhook_url,
            "discord": self.discord_webhook_url,
        }.get(channel)

    def safe_destination(self, channel: Channel) -> str:
        """The channel's destination without secrets: ``scheme://host[:port]``."""
        if channel == "email":
            host = self.smtp_host or "?"
            return f"smtp://{f'[{host}]' if ':' in host else host}:{self.smtp_port}"
        return redact_url(self.url_for(channel) or "")

    def _check_smtp(self) -> None:
        if self.smtp_host is None:
            return
        if self.smtp_from is None:
            raise ConfigError(
                "OUTBOX_SMTP_FROM", "required when OUTBOX_SMTP_HOST is set; set it to the sender address"
            )
        if not is_address(self.smtp_from):
            raise ConfigError("OUTBOX_SMTP_FROM", f"{self.smtp_from!r} is not an email address")
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ConfigError(
                "OUTBOX_SMTP_PASSWORD",
                "set OUTBOX_SMTP_USERNAME and OUTBOX_SMTP_PASSWORD together, or neither",
            )
        if self.smtp_username and self.smtp_tls == "none" and self.smtp_host not in _LOCAL_HOSTS:
            raise ConfigError(
                "OUTBOX_SMTP_TLS",
                f"none would send the SMTP password in clear text to {self.smtp_host}; use starttls or ssl",
            )


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` of a URL: no credentials, path or query (they hold tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


# --- configuration helpers -------------------------------------------------------------


def _text(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name, "").strip() or None


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    url = _text(env, name)
    if url is None:
        return None
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ConfigError(name, "has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The value is not echoed: it may carry a token.
        raise ConfigError(name, "must be an http:// or https:// URL with a host")
    return url


def _tls_mode(env: Mapping[str, str]) -> TlsMode:
    raw = (_text(env, "OUTBOX_SMTP_TLS") or "starttls").lower()
    for mode in TLS_MODES:
        if raw == mode:
            return mode
    raise ConfigError("OUTBOX_SMTP_TLS", f"unknown mode {raw!r}; use starttls, ssl or none")


def _port(env: Mapping[str, str], default: int) -> int:
    raw = _text(env, "OUTBOX_SMTP_PORT")
    if raw is None:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError("OUTBOX_SMTP_PORT", f"{raw!r} is not a whole number") from None
    if not 1 <= port <= 65535:
        raise ConfigError("OUTBOX_SMTP_PORT", f"{port} is not between 1 and 65535")
    return port


def _seconds(env: Mapping[str, str], name: str) -> float:
    raw = _text(env, name)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"{raw!r} must be a positive number of seconds")
    return value


def setting_hint(channel: Channel) -> str:
    """The variable(s) that enable ``channel``."""
    if channel == "email":
        return "OUTBOX_SMTP_HOST and OUTBOX_SMTP_FROM"
    return URL_VARIABLES[channel]


def is_address(value: str) -> bool:
    """Whether ``value`` is one plain email address."""
    if any(c in value for c in "\r\n,;"):
        return False
    _, address = parseaddr(value)
    local, _, domain = address.rpartition("@")
    return bool(local) and "." in domain and not any(c.isspace() for c in address)


# What enables each channel, for the warning of an outbox with none enabled.
ENABLING_VARIABLES: tuple[str, ...] = tuple(f"{setting_hint(c)} ({c})" for c in CHANNELS)
