"""Real receivers for delivery tests: an HTTP recorder and an SMTP recorder.

In a test: ``with HttpRecorder() as http: ...`` and ``with SmtpRecorder() as smtp: ...``.
As a process, for chaos tests that run worker subprocesses::

    python -m tests.receivers http --port N --log FILE [--status 200] [--delay 0]
    python -m tests.receivers smtp --port N --log FILE

Each writes one JSON line per request (or mail) to FILE, prints one JSON ready line with
its URL on stdout, and stops cleanly on SIGTERM or SIGINT. ``read_log`` and
``key_counts`` turn a log back into per-key counts.
"""

from __future__ import annotations

import argparse
import base64
import email
import email.policy
import json
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

LOCALHOST = "127.0.0.1"
KEY_HEADER = "Idempotency-Key"

_Record = TypeVar("_Record")


class _JsonLog:
    """Thread-safe JSON-lines writer; each line is flushed so readers see it at once."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, line: Mapping[str, Any]) -> None:
        if self._path is None:
            return
        with self._lock, self._path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")


class _Journal(Generic[_Record]):
    """Records in arrival order, with bounded waits for a count to be reached."""

    def __init__(self) -> None:
        self._records: list[_Record] = []
        self._changed = threading.Condition()

    def add(self, record: _Record) -> None:
        with self._changed:
            self._records.append(record)
            self._changed.notify_all()

    def snapshot(self) -> list[_Record]:
        with self._changed:
            return list(self._records)

    def wait_for(self, count: int, timeout_s: float) -> list[_Record]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._records) >= count, timeout_s):
                raise TimeoutError(f"{len(self._records)} of {count} records after {timeout_s:g}s")
            return list(self._records)


# --- HTTP ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Reply:
    """How the HTTP recorder answers: a status after an optional delay."""

    status: int = 200
    delay_s: float = 0.0
    body: bytes = b"ok"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class HttpRequestRecord:
    """One request as received, and the status the recorder chose to answer."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    status: int
    received_at: float

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    @property
    def idempotency_key(self) -> str | None:
        return self.header(KEY_HEADER)

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    def to_log(self) -> dict[str, Any]:
        return {
            "kind": "http",
            "method": self.method,
            "path": self.path,
            "idempotency_key": self.idempotency_key,
            "status": self.status,
            "accepted": self.accepted,
            "received_at": self.received_at,
            "headers": dict(self.headers),
            "body": self.body.decode("utf-8", "replace"),
        }


class _HttpServer(ThreadingHTTPServer):
    # Handler threads are joined by server_close, so nothing outlives a test.
    daemon_threads = False
    block_on_close = True
    recorder: HttpRecorder

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout test) is expected, not an error to print.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _HttpHandler(BaseHTTPRequestHandler):
    server: _HttpServer
    timeout = 10  # a stalled client cannot keep a handler thread (and stop()) waiting

    def do_POST(self) -> None:
        self.server.recorder._serve(self)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpRecorder:
    """A real HTTP server on 127.0.0.1 that records every request and answers as told."""

    def __init__(self, *, port: int = 0, log_path: Path | None = None, default: Reply | None = None) -> None:
        self._requested_port = port
        self._log = _JsonLog(log_path)
        self._journal: _Journal[HttpRequestRecord] = _Journal()
        self._default = default or Reply()
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> HttpRecorder:
        server = _HttpServer((LOCALHOST, self._requested_port), _HttpHandler)
        server.recorder = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="http-recorder", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()  # cuts short the delay of slow replies
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> HttpRecorder:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "recorder not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def url_for(self, path: str) -> str:
        return self.url + "/" + path.lstrip("/")

    # behaviour

    def reply(
        self,
        status: int = 200,
        *,
        delay_s: float = 0.0,
        body: bytes = b"ok",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer every later request this way (after any scripted replies)."""
        with self._lock:
            self._default = Reply(status=status, delay_s=delay_s, body=body, headers=dict(headers or {}))

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies`` in order, then the default."""
        with self._lock:
            self._script.extend(replies)

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if self._script else self._default

    def _serve(self, handler: _HttpHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        reply = self._next_reply()
        record = HttpRequestRecord(
            method=handler.command,
            path=handler.path,
            headers=dict(handler.headers.items()),
            body=body,
            status=reply.status,
            received_at=time.time(),
        )
        self._journal.add(record)
        self._log.write(record.to_log())
        if reply.delay_s and self._stopping.wait(reply.delay_s):
            return
        try:
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(reply.body)))
            handler.end_headers()
            handler.wfile.write(reply.body)
        except OSError:
            pass  # the client timed out and left

    # what arrived

    @property
    def requests(self) -> list[HttpRequestRecord]:
        return self._journal.snapshot()

    @property
    def total_calls(self) -> int:
        return len(self.requests)

    def distinct_keys(self) -> set[str]:
        return set(key_counts(r.to_log() for r in self.requests))

    def key_counts(self, *, accepted_only: bool = False) -> Counter[str]:
        """Calls per Idempotency-Key; with ``accepted_only``, only those answered 2xx."""
        return key_counts((r.to_log() for r in self.requests), accepted_only=accepted_only)

    def duplicates(self) -> dict[str, int]:
        """Keys accepted more than once: effects that happened twice."""
        return {k: n for k, n in self.key_counts(accepted_only=True).items() if n > 1}

    def wait_for_calls(self, count: int, timeout_s: float = 10.0) -> list[HttpRequestRecord]:
        return self._journal.wait_for(count, timeout_s)


def key_counts(lines: Iterable[Mapping[str, Any]], *, accepted_only: bool = False) -> Counter[str]:
    """Per-key counts of log lines (HTTP requests or mails) that carry an idempotency key."""
    counts: Counter[str] = Counter()
    for line in lines:
        key = line.get("idempotency_key")
        if key is not None and (line.get("accepted") or not accepted_only):
            counts[key] += 1
    return counts


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a receiver process wrote (none when it has not written yet)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    # A line being written concurrently may be incomplete; it is read next time.
    return [json.loads(line) for line in lines if line.endswith("}")]


# --- SMTP ------------------------------------------------------------------------------


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
        self._log = _JsonLog(log_path)
        self._journal: _Journal[SmtpMessageRecord] = _Journal()
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


# --- standalone process ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    receiver: HttpRecorder | SmtpRecorder
    if args.kind == "http":
        receiver = HttpRecorder(
            port=args.port, log_path=args.log, default=Reply(status=args.status, delay_s=args.delay)
        )
        receiver.start()
        ready = {"event": "RECEIVER_READY", "kind": "http", "url": receiver.url, "port": receiver.port}
    else:
        receiver = SmtpRecorder(port=args.port, log_path=args.log)
        receiver.start()
        ready = {"event": "RECEIVER_READY", "kind": "smtp", "host": receiver.host, "port": receiver.port}
    print(json.dumps(ready), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        receiver.stop()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.receivers", description="Run a recording receiver until SIGTERM."
    )
    parser.add_argument("kind", choices=("http", "smtp"))
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument(
        "--log", type=Path, required=True, help="file that gets one JSON line per request or mail"
    )
    parser.add_argument("--status", type=int, default=200, help="HTTP status to answer")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering")
    return parser


if __name__ == "__main__":
    sys.exit(main())
