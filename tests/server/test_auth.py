"""API keys: every route but the probes needs one, checked before the body is read; keys from flags, variables
and files; never in logs or error bodies."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import TEST_MODEL, ServerProcess

KEYS = ("first-key", "second-key", "file-key")


@pytest.fixture(scope="module")
def keyed(relative_checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    """One key from a flag and one from a file; the variable's key is not used, since the flag wins."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# operators' keys\n\nfile-key\n")
    process = ServerProcess(
        relative_checkpoint,
        "--api-key",
        KEYS[0],
        "--api-key-file",
        str(key_file),
        "--log-level",
        "info",
        env={"WINDOWLM_API_KEY": KEYS[1]},  # a flag wins over the variable: this key is not configured
    )
    yield process
    process.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("HEAD", "/v1/models"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("POST", "/v1/completions"),
        ("GET", "/no/such/route"),
        ("GET", "/v1/models/"),  # path variants of open and closed routes
        ("GET", "//v1/models"),
        ("GET", "/v1/%6Dodels"),
        ("GET", "/health/"),
        ("GET", "/metrics/"),
    ],
)
def test_every_route_but_the_probes_needs_a_key(keyed: ServerProcess, method: str, path: str) -> None:
    response = httpx.request(method, f"{keyed.url}{path}")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    if method != "HEAD":
        assert response.json()["error"]["type"] == "authentication_error"
    wrong = httpx.request(method, f"{keyed.url}{path}", headers=bearer("not-a-key"))
    assert wrong.status_code == 401


def test_probes_need_no_key(keyed: ServerProcess) -> None:
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    assert httpx.get(f"{keyed.url}/ready").status_code == 200


def test_each_configured_key_works_and_only_those(keyed: ServerProcess) -> None:
    body = {"model": TEST_MODEL, "prompt": "x", "max_tokens": 1}
    for key, works in ((KEYS[0], True), (KEYS[1], False), (KEYS[2], True)):
        response = httpx.post(f"{keyed.url}/v1/completions", json=body, headers=bearer(key))
        assert (response.status_code == 200) is works, (key, response.text)
    assert httpx.get(f"{keyed.url}/metrics", headers=bearer(KEYS[2])).status_code == 200
    assert httpx.get(f"{keyed.url}/openapi.json", headers=bearer(KEYS[0])).status_code == 200


def test_the_key_is_checked_before_the_body_is_read(keyed: ServerProcess) -> None:
    malformed = httpx.post(f"{keyed.url}/v1/completions", content=b"{not json")
    assert malformed.status_code == 401
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=5) as sock:
        # a head announcing 50 MB, and no body at all: the 401 comes without waiting for it
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401")


def test_keys_never_reach_logs_or_error_bodies(keyed: ServerProcess) -> None:
    leaked = "leaked-secret-value"
    response = httpx.get(f"{keyed.url}/v1/models?api_key={leaked}", headers=bearer(leaked))
    assert leaked not in response.text
    httpx.get(f"{keyed.url}/health?token={leaked}")
    output = keyed.output()
    assert "/health" in output  # the access log is on
    assert leaked not in output and KEYS[0] not in output and KEYS[2] not in output


def test_settings_can_open_metrics_and_docs(relative_checkpoint) -> None:
    server = ServerProcess(relative_checkpoint, "--api-key", "k", "--public-metrics", "--public-docs")
    try:
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        assert httpx.get(f"{server.url}/openapi.json").status_code == 200
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
    finally:
        server.stop()


def test_an_empty_key_file_fails_start_up(relative_checkpoint, tmp_path: Path) -> None:
    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(RuntimeError, match="holds no key"):
        ServerProcess(relative_checkpoint, "--api-key-file", str(empty))
