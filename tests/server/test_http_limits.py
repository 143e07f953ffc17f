"""What a connection may do before its request reaches the app: a timed request head, bounded in size and fields.

Raw sockets play the clients, against a real `windowlm serve` with a 1 s head timer and a 1 s keep-alive."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import TEST_MODEL, ServerProcess

HEADER_TIMEOUT = 1.0
CLOSE_MARGIN = 1.5  # seconds a close may take beyond the timeout on a loaded machine


@pytest.fixture(scope="module")
def server(relative_checkpoint: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(relative_checkpoint, "--header-timeout", str(HEADER_TIMEOUT), "--keepalive-timeout", "1")
    yield process
    process.stop()


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def closed_by_server(sock: socket.socket, within: float, trickle: bytes = b"") -> bool:
    """Whether the server closes the socket within `within` s, while we send `trickle` one byte every 0.3 s."""
    deadline = time.monotonic() + within
    pending = iter(trickle)
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.3)
        try:
            if readable and sock.recv(65536) == b"":
                return True
            if (byte := next(pending, None)) is not None:
                sock.sendall(bytes([byte]))
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response, read to its Content-Length (or to the close); (status, lowercased headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    length = int(headers.get("content-length", -1))
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def send_ignoring_close(sock: socket.socket, data: bytes, piece: int) -> None:
    """Send `data` in `piece`-byte writes; the server may answer and close before it has read them all."""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        for start in range(0, len(data), piece):
            sock.sendall(data[start : start + piece])


def assert_closed(sock: socket.socket) -> None:
    with contextlib.suppress(ConnectionResetError):  # closing with our head part unread makes the kernel reset
        assert sock.recv(1) == b""


def assert_json_error(response: tuple[int, dict[str, str], bytes], status: int, code: str) -> None:
    got_status, headers, body = response
    assert got_status == status, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["code"] == code
    assert error["message"]


def test_a_silent_connection_is_closed(server: ServerProcess) -> None:
    with connect(server) as sock:
        assert closed_by_server(sock, HEADER_TIMEOUT + CLOSE_MARGIN)


def test_a_head_sent_a_byte_at_a_time_is_closed(server: ServerProcess) -> None:
    slowloris = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    with connect(server) as sock:
        assert closed_by_server(sock, HEADER_TIMEOUT + CLOSE_MARGIN, trickle=slowloris)


def test_the_head_timer_restarts_on_a_kept_alive_connection(server: ServerProcess) -> None:
    """Requests on one connection keep working; a slow head after them is closed like a first one."""
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
            time.sleep(0.4)  # idle, but within the keep-alive
        assert closed_by_server(
            sock, HEADER_TIMEOUT + CLOSE_MARGIN, trickle=b"GET /health HTTP/1.1\r\nX: " + b"a" * 100
        )


@pytest.mark.parametrize(
    ("header_bytes", "piece"),
    [(64 * 1024, 1 << 20), (64 * 1024, 1024), (1024 * 1024, 1 << 20)],
    ids=["64KB", "64KB-in-1KB-packets", "1MB"],
)
def test_a_large_head_gets_431(server: ServerProcess, header_bytes: int, piece: int) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * header_bytes + b"\r\n\r\n"
    with connect(server) as sock:
        send_ignoring_close(sock, request, piece)
        assert_json_error(read_response(sock), 431, "request_header_fields_too_large")
        assert_closed(sock)


def test_too_many_header_fields_get_431(server: ServerProcess) -> None:
    fields = b"".join(b"X-Field-%d: 1\r\n" % i for i in range(101))
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        assert_json_error(read_response(sock), 431, "request_header_fields_too_large")
    with connect(server) as sock:  # a HEAD request is answered without a body
        sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        status, _, body = read_response(sock)
        assert (status, body) == (431, b"")


def test_malformed_http_gets_a_json_400(server: ServerProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        assert_json_error(read_response(sock), 400, "invalid_http_request")


def test_a_stream_longer_than_the_head_timer_is_not_cut(server: ServerProcess) -> None:
    """The stream is read for twice the head timer (or to its end): it must still be flowing after the timer."""
    body = json.dumps({"model": TEST_MODEL, "prompt": "x", "max_tokens": 2000, "stream": True}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with connect(server) as sock:
        start = time.monotonic()
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        received, last_data = b"", 0.0
        while b"data: [DONE]" not in received and time.monotonic() - start < 2 * HEADER_TIMEOUT + 0.5:
            chunk = sock.recv(65536)
            assert chunk, f"stream cut after {time.monotonic() - start:.1f} s: {received[-300:]!r}"
            received, last_data = received + chunk, time.monotonic() - start
        assert received.startswith(b"HTTP/1.1 200")
        assert last_data > HEADER_TIMEOUT + 0.3, "the stream ended before the head timer would have fired"
