"""A real SMTP receiver for delivery tests: ``SmtpRecorder`` (aiosmtpd, a dev dependency)
records every mail on 127.0.0.1. ``with SmtpRecorder() as smtp: ...``; as a process:
``python -m scripts.harness.receivers smtp --port N --log FILE``."""

from __future__ import annotations

import base64
import email
import email.policy
import socket
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from scripts.harness.receivers import KEY_HEADER, LOCALHOST, Journal, JsonLog


@dataclass(frozen=True, kw_only=True)
class SmtpMessageRecord:
    """One mail transaction as received, and the reply the recorder gave to DATA."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    reply: str
    login: str | None
    received_at: float

    @property
    def accepted(self) -> bool:
        return self.reply.startswith("250")

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def message_id(self) -> str | None:
        value = self.message["Message-ID"]
        return None if value is None else str(value)

    @property
    def idempotency_key(self) -> str | None:
        value = self.message[KEY_HEADER]
        return None if value is None else str(value)

    def to_log(self) -> dict[str, Any]:
        return {
            "kind": "smtp",
            "mail_from": self.mail_from,
            "rcpt_tos": list(self.rcpt_tos),
            "message_id": self.message_id,
            "idempotency_key": self.idempotency_key,
            "reply": self.reply,
            "accepted": self.accepted,
            "login": self.login,
            "received_at": self.received_at,
            "content": base64.b64encode(self.content).decode(),
        }


class _SmtpHandler:
    def __init__(self, recorder: SmtpRecorder) -> None:
        self._recorder = recorder

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self._recorder._on_data(session, envelope)


class SmtpRecorder:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that records every mail.

    With ``credentials`` it advertises AUTH (without TLS, as local test servers do) and
    accepts only that login.
    """

    def __init__(
        self, *, port: int = 0, log_path: Path | None = None, credentials: tuple[str, str] | None = None
    ) -> None:
        self._requested_port = port
        self._log = JsonLog(log_path)
        self._journal: Journal[SmtpMessageRecord] = Journal()
        self._credentials = credentials
        self._reply = "250 2.0.0 Message accepted for delivery"
        self._controller: Controller | None = None
        self.port = 0

    def start(self) -> SmtpRecorder:
        # aiosmtpd checks readiness by connecting to its port, so it needs a real one.
        self.port = self._requested_port or _free_port()
        kwargs: dict[str, Any] = {}
        if self._credentials is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        self._controller = Controller(
            _SmtpHandler(self), hostname=LOCALHOST, port=self.port, ready_timeout=10, **kwargs
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpRecorder:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return LOCALHOST

    def reply(self, line: str) -> None:
        """Answer DATA with ``line`` from now on, e.g. "451 4.3.0 Try later"."""
        self._reply = line

    @property
    def records(self) -> list[SmtpMessageRecord]:
        """Every DATA received, accepted or not."""
        return self._journal.snapshot()

    @property
    def messages(self) -> list[SmtpMessageRecord]:
        """The mails the recorder accepted."""
        return [r for r in self.records if r.accepted]

    def wait_for_records(self, count: int, timeout_s: float = 10.0) -> list[SmtpMessageRecord]:
        return self._journal.wait_for(count, timeout_s)

    def _on_data(self, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        auth: Any = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        record = SmtpMessageRecord(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content,
            reply=self._reply,
            login=login,
            received_at=time.time(),
        )
        self._journal.add(record)
        self._log.write(record.to_log())
        return record.reply

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        expected = self._credentials
        ok = (
            expected is not None
            and isinstance(auth_data, LoginPassword)
            and (auth_data.login.decode(), auth_data.password.decode()) == expected
        )
        # handled=False: aiosmtpd then sends the 235 or 535 reply itself.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOCALHOST, 0))
        return int(probe.getsockname()[1])
