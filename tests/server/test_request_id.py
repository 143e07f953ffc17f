"""Every response carries `x-request-id`: the client's own X-Request-Id when it is sane, else a new one; on
errors the gate or the routes answer and on streams too; and the same id ends the request's access log line."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import TEST_MODEL, ServerProcess

KEY = "id-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NEW_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server(relative_checkpoint) -> Iterator[ServerProcess]:
    """With an API key (for a 401), a small body limit (for a 413) and the access log on."""
    process = ServerProcess(relative_checkpoint, "--api-key", KEY, "--max-body-bytes", "2000", "--log-level", "info")
    yield process
    process.stop()


def test_a_sane_id_is_echoed(server: ServerProcess) -> None:
    for given in ("abc-123", "a" * 128, "trace:1/2;x=y!~"):
        response = httpx.get(f"{server.url}/health", headers={"X-Request-Id": given})
        assert response.headers["x-request-id"] == given


def test_without_an_id_each_response_gets_a_new_one(server: ServerProcess) -> None:
    ids = [httpx.get(f"{server.url}/health").headers["x-request-id"] for _ in range(3)]
    assert all(NEW_ID.fullmatch(rid) for rid in ids) and len(set(ids)) == 3


@pytest.mark.parametrize("given", [b"has space", b"a" * 129, b"caf\xc3\xa9", b""])
def test_an_insane_id_is_replaced(server: ServerProcess, given: bytes) -> None:
    response = httpx.get(f"{server.url}/health", headers={b"X-Request-Id": given})
    assert response.status_code == 200 and NEW_ID.fullmatch(response.headers["x-request-id"])
    assert len(response.headers.get_list("x-request-id")) == 1


def test_errors_carry_the_id(server: ServerProcess) -> None:
    completion = {"model": TEST_MODEL, "prompt": "x", "max_tokens": -1}
    answers = {
        401: httpx.get(f"{server.url}/v1/models", headers={"X-Request-Id": "e401"}),
        404: httpx.get(f"{server.url}/nothing/here", headers={**AUTH, "X-Request-Id": "e404"}),
        400: httpx.post(f"{server.url}/v1/completions", json=completion, headers={**AUTH, "X-Request-Id": "e400"}),
        413: httpx.post(f"{server.url}/tokenize", content=b"x" * 5000, headers={**AUTH, "X-Request-Id": "e413"}),
    }
    for status, response in answers.items():
        assert response.status_code == status and response.headers["x-request-id"] == f"e{status}"


def test_a_stream_carries_the_id(server: ServerProcess) -> None:
    body = {"model": TEST_MODEL, "prompt": "s", "max_tokens": 4, "stream": True}
    headers = {**AUTH, "X-Request-Id": "stream-1"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"] == "stream-1"
        assert "[DONE]" in response.read().decode()


def test_the_access_log_line_ends_with_the_id(server: ServerProcess) -> None:
    given = f"log-{uuid.uuid4().hex}"
    httpx.get(f"{server.url}/health", headers={"X-Request-Id": given})
    generated = httpx.get(f"{server.url}/ready").headers["x-request-id"]
    deadline = time.monotonic() + 10
    while f"request_id={generated}" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = server.output().splitlines()
    assert any('"GET /health HTTP/1.1" 200' in line and line.endswith(f" request_id={given}") for line in lines)
    assert any('"GET /ready HTTP/1.1" 200' in line and line.endswith(f" request_id={generated}") for line in lines)


def test_an_internal_error_is_a_500_in_the_error_shape_with_the_request_id() -> None:
    """The gate answers for an app that raises before answering (Starlette's last-resort handler sits outside
    it and would send no request id)."""
    import asyncio

    from server.config import Settings
    from server.gate import RequestGate
    from server.metrics import Metrics
    from server.state import ServerState

    async def broken_app(scope, receive, send) -> None:
        raise RuntimeError("a bug")

    gate = RequestGate(broken_app, ServerState(settings=Settings(), metrics=Metrics()))

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", json={}, headers={"X-Request-Id": "bug-1"})

    response = asyncio.run(call())
    assert response.status_code == 500 and response.headers["x-request-id"] == "bug-1"
    assert response.json()["error"] == {
        "message": "internal error: RuntimeError",
        "type": "server_error",
        "param": None,
        "code": None,
    }
