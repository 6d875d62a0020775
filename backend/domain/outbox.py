"""Outbound delivery for the outbox worker: generic webhook, Slack, Discord and email.

Nothing is reported delivered unless the receiver accepted it. Failures are classified:
``PermanentJobError`` (dead-lettered at once) when retrying cannot help, ``DeliveryError``
(retried with backoff) when it may. Errors and receipts name an HTTP destination as
``scheme://host`` only, because webhook paths carry the tokens that authorise them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import IO, Any, Literal, get_args
from urllib.parse import urlsplit

from backend import __version__
from backend.errors import ConfigError, PermanentJobError, WorkerError
from backend.jobs import Job

Channel = Literal["webhook", "slack", "discord", "email"]
TlsMode = Literal["starttls", "ssl", "none"]
CHANNELS: tuple[Channel, ...] = get_args(Channel)
TLS_MODES: tuple[TlsMode, ...] = get_args(TlsMode)

DEFAULT_SMTP_PORT = 587
DEFAULT_SMTPS_PORT = 465
DEFAULT_TIMEOUT_S = 10.0
DISCORD_MAX_CONTENT = 2000
MAX_SUBJECT_LENGTH = 998  # RFC 5322 line limit; longer subjects cannot travel as one header
RETRYABLE_4XX = frozenset({408, 429})
_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_MESSAGE_FIELDS = frozenset({"channel", "subject", "body", "to", "data"})

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

_URL_VARIABLES: Mapping[Channel, str] = {
    "webhook": "OUTBOX_WEBHOOK_URL",
    "slack": "OUTBOX_SLACK_WEBHOOK_URL",
    "discord": "OUTBOX_DISCORD_WEBHOOK_URL",
}


class DeliveryError(WorkerError):
    """A delivery that may succeed later (5xx, 408, 429, timeout, connection or SMTP 4xx).

    ``retry_after_s`` carries the receiver's ``Retry-After`` when it sent one.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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
        if not _is_address(self.smtp_from):
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


@dataclass(frozen=True, kw_only=True)
class OutboundMessage:
    """A validated outbox payload."""

    channel: Channel
    subject: str
    body: str
    to: str | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class EntityRef:
    """The case a message is about; sent along with generic webhooks."""

    entity_type: str
    entity_id: str
    org_id: str


@dataclass(frozen=True, kw_only=True)
class DeliveryReceipt:
    """What the receiver answered: HTTP status or SMTP reply code and text."""

    channel: Channel
    destination: str
    status: int
    response: str
    message_id: str


def parse_message(payload: Any) -> OutboundMessage:
    """Validate a job's payload; raise ``PermanentJobError`` saying what is wrong."""
    if not isinstance(payload, Mapping):
        raise PermanentJobError(f"outbox payload must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(str(k) for k in set(payload) - _MESSAGE_FIELDS)
    if unknown:
        raise PermanentJobError(
            f"outbox payload has unknown field(s): {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_MESSAGE_FIELDS))}"
        )
    channel = payload.get("channel")
    if channel not in CHANNELS:
        raise PermanentJobError(f"unknown channel {channel!r}; use one of {', '.join(CHANNELS)}")
    data = payload.get("data")
    if data is not None and not isinstance(data, Mapping):
        raise PermanentJobError("data must be a JSON object when present")
    return OutboundMessage(
        channel=channel,
        subject=_subject(payload),
        body=_body(payload),
        to=_recipient(channel, payload.get("to")),
        data=data,
    )


def stable_message_id(idempotency_key: str) -> str:
    """The same Message-ID for every attempt of one key, so mail systems can deduplicate."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@dragonfly.outbox>"


def deliver(
    message: OutboundMessage, *, idempotency_key: str, config: OutboxConfig, entity: EntityRef | None = None
) -> DeliveryReceipt:
    """Send ``message`` on its channel and return the receiver's answer."""
    _check_key(idempotency_key)
    if message.channel not in CHANNELS:
        raise PermanentJobError(f"unknown channel {message.channel!r}")
    if not config.is_configured(message.channel):
        raise PermanentJobError(
            f"channel {message.channel} is not configured: set {_setting_hint(message.channel)}"
        )
    if message.channel == "email":
        return _send_email(message, idempotency_key, config)
    document = _http_document(message, idempotency_key, entity)
    return _post_json(
        message.channel,
        config.url_for(message.channel) or "",
        document,
        idempotency_key,
        config.http_timeout_s,
    )


def deliver_job(job: Job, *, config: OutboxConfig) -> DeliveryReceipt:
    """Parse the job's payload and deliver it under the job's idempotency key."""
    entity = EntityRef(entity_type=job.entity_type, entity_id=job.entity_id, org_id=job.org_id)
    return deliver(
        parse_message(job.payload), idempotency_key=job.idempotency_key, config=config, entity=entity
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


def _setting_hint(channel: Channel) -> str:
    if channel == "email":
        return "OUTBOX_SMTP_HOST and OUTBOX_SMTP_FROM"
    return _URL_VARIABLES[channel]


# --- message validation ----------------------------------------------------------------


def _subject(payload: Mapping[str, Any]) -> str:
    subject = payload.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        raise PermanentJobError("subject must be a non-empty string")
    if "\r" in subject or "\n" in subject:
        raise PermanentJobError("subject must be one line (no CR or LF)")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise PermanentJobError(f"subject is longer than {MAX_SUBJECT_LENGTH} characters")
    return subject


def _body(payload: Mapping[str, Any]) -> str:
    body = payload.get("body")
    if not isinstance(body, str) or not body.strip():
        raise PermanentJobError("body must be a non-empty string")
    return body


def _recipient(channel: Channel, to: Any) -> str | None:
    if channel != "email":
        if to is not None:
            raise PermanentJobError(f"to is only for the email channel, not {channel}")
        return None
    if not isinstance(to, str) or not to.strip():
        raise PermanentJobError("to must be a non-empty string (the recipient) for email")
    if not _is_address(to):
        raise PermanentJobError(f"to {to!r} is not one email address")
    return to


def _is_address(value: str) -> bool:
    if any(c in value for c in "\r\n,;"):
        return False
    _, address = parseaddr(value)
    local, _, domain = address.rpartition("@")
    return bool(local) and "." in domain and not any(c.isspace() for c in address)


def _check_key(key: str) -> None:
    # The key travels in an HTTP or mail header: printable ASCII only, one line.
    if not key or not key.isascii() or not key.isprintable():
        raise PermanentJobError(
            "idempotency_key must be printable ASCII to be sent in the Idempotency-Key header"
        )


# --- HTTP channels ---------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Following a redirect turns a POST into a body-less GET: a delivery that did not
    # happen would look like a success. The 3xx surfaces as an HTTPError instead.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _http_document(message: OutboundMessage, key: str, entity: EntityRef | None) -> dict[str, Any]:
    if message.channel == "slack":
        return {"text": f"*{message.subject}*\n{message.body}"}
    if message.channel == "discord":
        content = f"**{message.subject}**\n{message.body}"
        if len(content) > DISCORD_MAX_CONTENT:
            content = content[: DISCORD_MAX_CONTENT - 1] + "…"
        # Text from case data must not ping @everyone or roles.
        return {"content": content, "allowed_mentions": {"parse": []}}
    document: dict[str, Any] = {
        "idempotency_key": key,
        "message_id": stable_message_id(key),
        "channel": message.channel,
        "subject": message.subject,
        "body": message.body,
        "data": dict(message.data) if message.data is not None else None,
    }
    if entity is not None:
        document.update(entity_type=entity.entity_type, entity_id=entity.entity_id, org_id=entity.org_id)
    return document


def _post_json(
    channel: Channel, url: str, document: Mapping[str, Any], key: str, timeout_s: float
) -> DeliveryReceipt:
    destination = redact_url(url)
    request = urllib.request.Request(
        url,
        data=json.dumps(document).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "User-Agent": f"dragonfly-outbox/{__version__}",
        },
    )
    try:
        # The status line is the receiver's verdict; the body is not needed.
        with _OPENER.open(request, timeout=timeout_s) as response:
            status, reason = int(response.status), str(response.reason)
    except urllib.error.HTTPError as exc:
        raise _http_failure(channel, destination, exc) from None
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(
            f"{channel} delivery to {destination} failed: {_network_reason(exc, timeout_s)}; will retry"
        ) from None
    return DeliveryReceipt(
        channel=channel,
        destination=destination,
        status=status,
        response=reason,
        message_id=stable_message_id(key),
    )


def _http_failure(channel: Channel, destination: str, exc: urllib.error.HTTPError) -> WorkerError:
    try:
        detail = exc.read(200).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        detail = ""
    finally:
        exc.close()
    text = f"{channel} delivery to {destination} got HTTP {exc.code}"
    text += f" ({detail})" if detail else ""
    if exc.code >= 500 or exc.code in RETRYABLE_4XX:
        return DeliveryError(
            f"{text}; will retry", retry_after_s=_retry_after(exc.headers.get("Retry-After"))
        )
    if 300 <= exc.code < 400:
        return PermanentJobError(
            f"{text}: redirects are not followed; set {_URL_VARIABLES[channel]} to the final URL"
        )
    return PermanentJobError(f"{text}: the receiver rejected the message")


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None  # an HTTP date: leave the delay to the runtime's backoff
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _network_reason(exc: BaseException, timeout_s: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout_s:g}s"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(reason)


# --- email -----------------------------------------------------------------------------


class _SMTP(smtplib.SMTP):
    # smtplib.sendmail drops the reply to DATA; keep it, since it is the receipt.
    data_reply: tuple[int, bytes] = (0, b"")

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_reply = super().data(msg)
        return self.data_reply


class _SMTPSSL(_SMTP, smtplib.SMTP_SSL):
    pass


def _send_email(message: OutboundMessage, key: str, config: OutboxConfig) -> DeliveryReceipt:
    destination = config.safe_destination("email")
    where = f"email to {message.to} via {destination}"
    mail = _email_message(message, key, config.smtp_from or "")
    try:
        code, reply = _smtp_send(mail, message.to or "", config)
    except smtplib.SMTPRecipientsRefused as exc:
        raise _smtp_failure(where, *_first_refusal(exc)) from None
    except smtplib.SMTPResponseException as exc:
        raise _smtp_failure(where, exc.smtp_code, exc.smtp_error) from None
    except smtplib.SMTPNotSupportedError as exc:
        raise PermanentJobError(f"{where}: {exc}; check OUTBOX_SMTP_TLS") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(
            f"{where} failed: {_network_reason(exc, config.smtp_timeout_s)}; will retry"
        ) from None
    return DeliveryReceipt(
        channel="email",
        destination=destination,
        status=code,
        response=reply.decode("utf-8", "replace"),
        message_id=str(mail["Message-ID"]),
    )


def _email_message(message: OutboundMessage, key: str, sender: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = message.to
    mail["Subject"] = message.subject
    mail["Date"] = formatdate(usegmt=True)
    mail["Message-ID"] = stable_message_id(key)
    mail["Idempotency-Key"] = key
    mail.set_content(message.body)
    return mail


def _smtp_send(mail: EmailMessage, to: str, config: OutboxConfig) -> tuple[int, bytes]:
    client = _smtp_connect(config)
    try:
        if config.smtp_username and config.smtp_password:
            client.login(config.smtp_username, config.smtp_password)
        client.send_message(mail, to_addrs=[parseaddr(to)[1]])
        return client.data_reply
    finally:
        _smtp_close(client)


def _smtp_connect(config: OutboxConfig) -> _SMTP:
    host, port, timeout = config.smtp_host or "", config.smtp_port, config.smtp_timeout_s
    if config.smtp_tls == "ssl":
        return _SMTPSSL(host, port, timeout=timeout, context=ssl.create_default_context())
    client = _SMTP(host, port, timeout=timeout)
    if config.smtp_tls == "starttls":
        try:
            client.starttls(context=ssl.create_default_context())
        except (smtplib.SMTPException, OSError):
            client.close()
            raise
    return client


def _smtp_close(client: smtplib.SMTP) -> None:
    # Once DATA is accepted the mail is sent: a failing QUIT must not turn into a retry
    # (and a duplicate), so its errors are dropped.
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()


def _first_refusal(exc: smtplib.SMTPRecipientsRefused) -> tuple[int, bytes]:
    for code, reply in exc.recipients.values():
        return code, reply
    return 0, b"recipient refused"


def _smtp_failure(where: str, code: int, reply: bytes | str) -> WorkerError:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    summary = f"{where}: SMTP {code} {text}".rstrip()
    if 500 <= code < 600:
        return PermanentJobError(f"{summary}: permanent refusal")
    return DeliveryError(f"{summary}; will retry")
