"""The email channel: SMTP with STARTTLS or implicit TLS, a Message-ID derived from the
job's key, and the reply to DATA as the receipt."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any

from backend.domain.outbox.config import OutboxConfig
from backend.domain.outbox.message import (
    DeliveryError,
    DeliveryReceipt,
    OutboundMessage,
    network_reason,
    stable_message_id,
)
from backend.errors import PermanentJobError, WorkerError

# --- email -----------------------------------------------------------------------------


class _SMTP(smtplib.SMTP):
    # smtplib.sendmail drops the reply to DATA; keep it, since it is the receipt.
    data_reply: tuple[int, bytes] = (0, b"")

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_reply = super().data(msg)
        return self.data_reply


class _SMTPSSL(_SMTP, smtplib.SMTP_SSL):
    pass


def send_email(message: OutboundMessage, key: str, config: OutboxConfig) -> DeliveryReceipt:
    """Send one email; the reply to DATA is the receipt."""
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
            f"{where} failed: {network_reason(exc, config.smtp_timeout_s)}; a later attempt may succeed"
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
    return DeliveryError(f"{summary}; a later attempt may succeed")
