"""Backpressure, cancellation, health, metrics, API keys and the SIGTERM drain, against real processes."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import TEST_MODEL, ServerProcess

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENDLESS = {"model": TEST_MODEL, "prompt": "endless", "max_tokens": 16_000, "stream": True}


@pytest.fixture(scope="module")
def tiny(relative_checkpoint) -> Iterator[ServerProcess]:
    """One slot, one place in the queue, an API key, pings every 0.2 s."""
    flags = ("--max-batch-size", "1", "--max-queue", "1", "--api-key", KEY, "--ping-interval", "0.2")
    process = ServerProcess(relative_checkpoint, *flags)
    yield process
    process.stop()


class Stream:
    """A streaming completion held open by the test; its lines are read only when asked for."""

    def __init__(self, server: ServerProcess, body: dict, headers: dict | None = None) -> None:
        self.client = httpx.Client(timeout=30)
        request = self.client.build_request("POST", f"{server.url}/v1/completions", json=body, headers=headers)
        self.response = self.client.send(request, stream=True)
        self.lines = self.response.iter_lines()  # one iterator: closing it would close the connection

    def read_tokens(self, count: int) -> None:
        seen = 0
        while seen < count:
            if next(self.lines).startswith("data: {"):
                seen += 1

    def rest(self) -> list[str]:
        return list(self.lines)

    def close(self) -> None:
        self.response.close()
        self.client.close()


def test_api_key_is_required(tiny: ServerProcess) -> None:
    body = {"model": TEST_MODEL, "prompt": "x", "max_tokens": 2}
    response = httpx.post(f"{tiny.url}/v1/completions", json=body)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert (
        httpx.post(f"{tiny.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    assert httpx.post(f"{tiny.url}/v1/completions", json=body, headers=AUTH).status_code == 200
    assert httpx.get(f"{tiny.url}/health").status_code == 200  # probes need no key


def test_full_server_answers_429_and_streams_go_on(tiny: ServerProcess) -> None:
    first = Stream(tiny, ENDLESS, AUTH)
    second = Stream(tiny, ENDLESS, AUTH)  # waits in the queue
    try:
        first.read_tokens(3)
        assert tiny.wait_metric("windowlm_requests_waiting", 1) == 1
        # at once, not after waiting in a queue: the timeout is a hang guard far below the endless stream's life
        response = httpx.post(f"{tiny.url}/v1/completions", json={**ENDLESS, "stream": False}, headers=AUTH, timeout=20)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        first.read_tokens(5)  # the running stream is unaffected
        assert tiny.metric("windowlm_request_failures_total", reason="overloaded") >= 1
    finally:
        first.close()
        second.close()
    assert tiny.wait_metric("windowlm_kv_slots_used", 0) == 0


def test_disconnected_stream_frees_its_slot_and_a_queued_one_never_starts(tiny: ServerProcess) -> None:
    admitted_before = tiny.metric("windowlm_queue_time_seconds_count")
    cancelled_before = tiny.metric("windowlm_request_failures_total", reason="cancelled")
    running = Stream(tiny, ENDLESS, AUTH)
    running.read_tokens(3)
    assert tiny.metric("windowlm_kv_slots_used") == 1
    queued = Stream(tiny, ENDLESS, AUTH)
    assert tiny.wait_metric("windowlm_requests_waiting", 1) == 1
    queued.close()  # leaves while waiting: its queue place is freed at the next step
    assert tiny.wait_metric("windowlm_request_failures_total", cancelled_before + 1, reason="cancelled") == (
        cancelled_before + 1
    )
    assert tiny.metric("windowlm_requests_waiting") == 0
    running.read_tokens(3)
    running.close()  # leaves mid-stream
    assert tiny.wait_metric("windowlm_kv_slots_used", 0) == 0
    assert tiny.wait_metric("windowlm_requests_waiting", 0) == 0
    assert tiny.metric("windowlm_queue_time_seconds_count") == admitted_before + 1  # only the running one started
    assert tiny.wait_metric("windowlm_request_failures_total", cancelled_before + 2, reason="cancelled") == (
        cancelled_before + 2
    )


def test_a_stream_waiting_for_a_slot_gets_pings(tiny: ServerProcess) -> None:
    running = Stream(tiny, ENDLESS, AUTH)
    waiting = Stream(tiny, ENDLESS, AUTH)
    try:
        running.read_tokens(2)
        assert next(waiting.lines) == ": ping"  # read with the client's timeout as the hang guard
    finally:
        running.close()
        waiting.close()
    assert tiny.wait_metric("windowlm_kv_slots_used", 0) == 0


def test_a_request_that_can_never_fit_gets_400_not_429(tiny: ServerProcess) -> None:
    body = {"model": TEST_MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 2}  # 4 sequences; room for 2
    response = httpx.post(f"{tiny.url}/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_an_echo_stream_left_at_its_first_chunk_frees_its_slot(tiny: ServerProcess) -> None:
    stream = Stream(tiny, {**ENDLESS, "echo": True}, AUTH)
    next(stream.lines)
    stream.close()
    assert tiny.wait_metric("windowlm_kv_slots_used", 0) == 0


def test_non_streaming_request_is_aborted_when_its_client_leaves(tiny: ServerProcess) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny.url}/v1/completions", json={**ENDLESS, "stream": False}, headers=AUTH, timeout=0.5)
    assert tiny.wait_metric("windowlm_kv_slots_used", 0) == 0


def test_health_ready_and_metrics_parse(tiny: ServerProcess) -> None:
    assert httpx.get(f"{tiny.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{tiny.url}/ready").json() == {"status": "ready"}
    httpx.post(f"{tiny.url}/v1/completions", json={"model": TEST_MODEL, "prompt": "m", "max_tokens": 3}, headers=AUTH)
    families = {
        family.name: family
        for family in text_string_to_metric_families(httpx.get(f"{tiny.url}/metrics", headers=AUTH).text)
    }
    for name in (
        "windowlm_requests",
        "windowlm_request_failures",
        "windowlm_time_to_first_token_seconds",
        "windowlm_inter_token_latency_seconds",
        "windowlm_e2e_request_latency_seconds",
        "windowlm_queue_time_seconds",
        "windowlm_request_prompt_tokens",
        "windowlm_request_generation_tokens",
        "windowlm_batch_size_sequences",
        "windowlm_decode_step_seconds",
        "windowlm_requests_running",
        "windowlm_requests_waiting",
        "windowlm_kv_slots_used",
        "windowlm_kv_slots_capacity",
        "windowlm_prompt_tokens",
        "windowlm_generation_tokens",
    ):
        assert name in families, name
    assert tiny.metric("windowlm_kv_slots_capacity") == 1
    assert tiny.metric("windowlm_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert tiny.metric("windowlm_generation_tokens_total") >= 3


def test_head_answers_like_get_without_a_body(tiny: ServerProcess) -> None:
    for path, headers in (("/health", {}), ("/ready", {}), ("/metrics", AUTH)):
        got, head = httpx.get(f"{tiny.url}{path}", headers=headers), httpx.head(f"{tiny.url}{path}", headers=headers)
        assert head.status_code == got.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert int(head.headers["content-length"]) > 0, path
    assert httpx.head(f"{tiny.url}/metrics").status_code == 401  # HEAD passes the same key check


def test_sigterm_drains_streams_then_exits_zero(relative_checkpoint) -> None:
    # the drain timeout is a hang guard: the process leaves as soon as the stream has ended
    server = ServerProcess(relative_checkpoint, "--drain-timeout", "300")
    body = {"model": TEST_MODEL, "prompt": "drain", "max_tokens": 60, "stream": True}
    stream = Stream(server, body)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(stream.rest()))
    try:
        stream.read_tokens(2)
        reader.start()
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(f"{server.url}/ready").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(f"{server.url}/ready").json() == {"status": "draining"}
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": TEST_MODEL, "prompt": "late"})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        reader.join(300)
        assert server.process.wait(300) == 0
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert json.loads(data[-2].removeprefix("data: "))["choices"][-1]["finish_reason"] == "length"
    finally:
        stream.close()
        server.stop()


def test_drain_timeout_ends_streams_with_an_error_event(relative_checkpoint) -> None:
    server = ServerProcess(relative_checkpoint, "--drain-timeout", "0.5")
    stream = Stream(server, ENDLESS)
    try:
        stream.read_tokens(2)
        server.process.send_signal(signal.SIGTERM)
        lines = stream.rest()
        data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert "error" in json.loads(data[-2].removeprefix("data: "))
        assert server.process.wait(30) == 0
    finally:
        stream.close()
        server.stop()
