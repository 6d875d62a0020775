"""A local TCP proxy in front of PostgreSQL whose network can be cut: a worker connected
through it stays connected, but no byte passes either way until the cut is healed, as with a
network black hole (no reset, no close)."""

from __future__ import annotations

import select
import socket
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


def upstream_address(db_url: str) -> str | tuple[str, int]:
    """Where the server listens: its unix socket (the embedded server) or host and port."""
    parts = urlsplit(db_url)
    host = parse_qs(parts.query).get("host", [parts.hostname or "localhost"])[0]
    port = parts.port or 5432
    if host.startswith("/"):
        return str(Path(host) / f".s.PGSQL.{port}")
    return (host, port)


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to the server; ``cut`` stops every byte, ``heal`` resumes."""

    def __init__(self, db_url: str) -> None:
        self._upstream = upstream_address(db_url)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, password: str, database: str = "postgres") -> str:
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/{database}"

    def cut(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self._upstream, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self._upstream)
            return sock
        return socket.create_connection(self._upstream)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = self._connect_upstream()
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """Copy both ways; while cut, read nothing (the peers' data waits in the buffers)."""
        peers = {a: b, b: a}
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(0.05):
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in ready:
                    if not self._flowing.is_set():
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # ValueError: select on a socket close() just closed
            return
        finally:
            a.close()
            b.close()
