"""A real HTTP receiver for delivery tests, the chaos run and the demo: ``HttpRecorder``
records every request on 127.0.0.1 and answers as told. (Mail: ``scripts.harness.smtp``.)

In a test: ``with HttpRecorder() as http: ...``. As a process, for tests that run worker
subprocesses::

    python -m scripts.harness.receivers http --port N --log FILE [--status 200] [--delay 0]
    python -m scripts.harness.receivers smtp --port N --log FILE

Each writes one JSON line per request (or mail) to FILE, prints one JSON ready line with
its URL on stdout, and stops cleanly on SIGTERM or SIGINT. ``read_log`` and
``key_counts`` turn a log back into per-key counts.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

LOCALHOST = "127.0.0.1"
KEY_HEADER = "Idempotency-Key"

_Record = TypeVar("_Record")


class JsonLog:
    """Thread-safe JSON-lines writer; each line is flushed so readers see it at once."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, line: Mapping[str, Any]) -> None:
        if self._path is None:
            return
        with self._lock, self._path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")


class Journal(Generic[_Record]):
    """Records in arrival order, with bounded waits for a count to be reached."""

    def __init__(self) -> None:
        self._records: list[_Record] = []
        self._changed = threading.Condition()

    def add(self, record: _Record) -> int:
        """Append ``record``; its index, for ``update``."""
        with self._changed:
            self._records.append(record)
            self._changed.notify_all()
            return len(self._records) - 1

    def update(self, index: int, record: _Record) -> None:
        """Replace the record at ``index`` with what became known of it later."""
        with self._changed:
            self._records[index] = record

    def snapshot(self) -> list[_Record]:
        with self._changed:
            return list(self._records)

    def wait_for(self, count: int, timeout_s: float) -> list[_Record]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._records) >= count, timeout_s):
                raise TimeoutError(f"{len(self._records)} of {count} records after {timeout_s:g}s")
            return list(self._records)


@dataclass(frozen=True, kw_only=True)
class Reply:
    """How the HTTP recorder answers: a status after an optional delay."""

    status: int = 200
    delay_s: float = 0.0
    body: bytes = b"ok"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class HttpRequest:
    """One request as received."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    received_at: float

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    @property
    def idempotency_key(self) -> str | None:
        return self.header(KEY_HEADER)

    def json(self) -> Any:
        return json.loads(self.body)


# Chooses the reply to a request. Called one request at a time, so it may keep state (how
# often a key was seen) without a lock of its own.
Responder = Callable[[HttpRequest], Reply]


@dataclass(frozen=True, kw_only=True)
class HttpRequestRecord(HttpRequest):
    """One request as received, and the status the recorder chose to answer."""

    status: int
    caller_gone: bool = False  # the caller hung up while its (delayed) reply was held

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

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
        # A client that gave up (a timeout, a killed worker) is expected, not an error to print.
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
    """A real HTTP server on 127.0.0.1 that records every request and answers as told:
    the scripted replies first, then the ``responder``'s choice, else the default reply.

    A delayed reply is held until its delay is over, the recorder stops, or the caller
    hangs up (its record then says ``caller_gone``); ``waiting_ports`` names the callers
    waiting meanwhile.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        log_path: Path | None = None,
        default: Reply | None = None,
        responder: Responder | None = None,
    ) -> None:
        self._requested_port = port
        self._log = JsonLog(log_path)
        self._journal: Journal[HttpRequestRecord] = Journal()
        self._default = default or Reply()
        self._responder = responder
        self._script: list[Reply] = []
        self._waiting: set[int] = set()  # client ports of the callers whose reply is held
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

    def _next_reply(self, request: HttpRequest) -> Reply:
        with self._lock:
            if self._script:
                return self._script.pop(0)
            if self._responder is not None:
                return self._responder(request)
            return self._default

    def _serve(self, handler: _HttpHandler) -> None:
        received_at = time.time()
        length = int(handler.headers.get("Content-Length") or 0)
        request = HttpRequest(
            method=handler.command,
            path=handler.path,
            headers=dict(handler.headers.items()),
            body=handler.rfile.read(length) if length else b"",
            received_at=received_at,
        )
        reply = self._next_reply(request)
        record = HttpRequestRecord(**vars(request), status=reply.status)
        index = self._journal.add(record)
        self._log.write(record.to_log())
        if reply.delay_s and self._hold(handler, reply.delay_s):
            self._journal.update(index, replace(record, caller_gone=True))
            return
        if self._stopping.is_set():
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

    def _hold(self, handler: _HttpHandler, delay_s: float) -> bool:
        """Hold the reply for ``delay_s`` (less if the recorder stops); True when the caller
        hung up meanwhile."""
        port = int(handler.client_address[1])
        with self._lock:
            self._waiting.add(port)
        try:
            deadline = time.monotonic() + delay_s
            while (left := deadline - time.monotonic()) > 0 and not self._stopping.is_set():
                # The request is read and the caller sends nothing more: readable means closed.
                readable, _, _ = select.select([handler.connection], [], [], min(left, 0.1))
                if readable:
                    return bool(handler.connection.recv(1, socket.MSG_PEEK) == b"")
            return False
        except OSError:
            return True
        finally:
            with self._lock:
                self._waiting.discard(port)

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

    def waiting_ports(self) -> set[int]:
        """Client ports of the callers whose delayed reply is being held."""
        with self._lock:
            return set(self._waiting)


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


# --- standalone process ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop_receiver, ready = _start(args)
    print(json.dumps(ready), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        stop_receiver()
    return 0


def _start(args: argparse.Namespace) -> tuple[Callable[[], None], dict[str, Any]]:
    """Start the receiver ``args`` ask for; its stop function and its ready line."""
    if args.kind == "http":
        http = HttpRecorder(
            port=args.port, log_path=args.log, default=Reply(status=args.status, delay_s=args.delay)
        ).start()
        return http.stop, {"event": "RECEIVER_READY", "kind": "http", "url": http.url, "port": http.port}
    # aiosmtpd is a dev dependency: imported only when a mail receiver is asked for, so the
    # HTTP recorder (the demo's, the chaos run's) needs the standard library alone.
    from scripts.harness.smtp import SmtpRecorder

    smtp = SmtpRecorder(port=args.port, log_path=args.log).start()
    return smtp.stop, {"event": "RECEIVER_READY", "kind": "smtp", "host": smtp.host, "port": smtp.port}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.harness.receivers", description="Run a recording receiver until SIGTERM."
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
