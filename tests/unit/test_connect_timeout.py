"""A server that accepts the connection and never answers: the error names the host and
port it waited for (libpq says only "connection timeout expired"), never the password."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest

from backend.db.connect import connect
from backend.errors import describe

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel completes the handshake) and never
    sends a byte."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield int(server.getsockname()[1])


def test_a_timed_out_connection_names_the_host_and_port(silent_port: int) -> None:
    url = f"postgresql://postgres:Zz9-Never-Print-Me@127.0.0.1:{silent_port}/postgres"
    with pytest.raises(psycopg.OperationalError) as caught:
        connect(url, "timeout-test")
    text = describe(caught.value)
    assert "timeout expired" in text
    assert f"127.0.0.1:{silent_port}" in text
    assert "Never-Print" not in text
