"""The engine survives its own failures and its clients: a failing row fails alone, a dead loop ends the process,
a client that stops reading holds no growing memory, a client that left while queued never starts."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.faults import VARIABLE
from tests.server.conftest import TEST_MODEL, ServerProcess


def stream_lines(server: ServerProcess, body: dict) -> list[str]:
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def streamed_text(lines: list[str]) -> str:
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    return "".join(choice["text"] for chunk in chunks for choice in chunk.get("choices", []))


def test_a_failing_row_fails_alone_and_the_others_keep_their_text(relative_checkpoint) -> None:
    server = ServerProcess(relative_checkpoint, "--max-batch-size", "4", env={VARIABLE: "row=FAULT-ROW"})
    prompts = ["Once upon a time", "FAULT-ROW here", "The quick brown fox"]
    body = {"model": TEST_MODEL, "max_tokens": 60, "temperature": 0}
    try:
        results: dict[str, list[str]] = {}
        threads = [
            threading.Thread(target=lambda p=p: results.__setitem__(p, stream_lines(server, {**body, "prompt": p})))
            for p in prompts
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        failed = results[prompts[1]]
        assert failed[-1] == "data: [DONE]" and "injected fault" in json.loads(failed[-2][6:])["error"]["message"]
        assert "running each slot alone" in server.output()  # the fault hit a batched step
        for prompt in (prompts[0], prompts[2]):
            alone = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": prompt}, timeout=60).json()
            assert streamed_text(results[prompt]) == alone["choices"][0]["text"]
            assert alone["usage"]["completion_tokens"] == 60
        whole = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": prompts[1]}, timeout=60)
        assert whole.status_code == 500 and "injected fault" in whole.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert server.metric("windowlm_request_failures_total", reason="error") == 2
    finally:
        server.stop()


def test_a_dead_engine_loop_ends_the_process_with_an_error(relative_checkpoint) -> None:
    server = ServerProcess(relative_checkpoint, env={VARIABLE: "loop=FAULT-LOOP"})
    try:
        body = {"model": TEST_MODEL, "prompt": "FAULT-LOOP", "max_tokens": 5}
        started = time.monotonic()
        lines = stream_lines(server, body)
        assert lines[-1] == "data: [DONE]" and "engine failure" in lines[-2]
        assert server.process.wait(5) == 1
        assert time.monotonic() - started < 5
    finally:
        server.stop()


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def read_to_end(sock: socket.socket, timeout: float) -> bool:
    """Read what the server sent; True once it closed the connection within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass
    except TimeoutError:
        return False
    return True


def open_without_reading(server: ServerProcess, body: dict) -> socket.socket:
    """A client that sends a streaming request and then never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
    )
    head += "\r\n\r\n"
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.slow
def test_clients_that_stop_reading_are_paused_then_ended(relative_checkpoint) -> None:
    server = ServerProcess(relative_checkpoint, "--max-batch-size", "32", "--stall-timeout", "40")
    body = {"model": TEST_MODEL, "prompt": "x", "max_tokens": 16000, "n": 8, "logprobs": 20, "stream": True}
    sockets = [open_without_reading(server, body) for _ in range(3)]
    try:
        # once the socket buffers are full, every stream is paused (the timeout guards against a hang)
        assert server.wait_metric("windowlm_requests_paused", 24, timeout=120) == 24
        rss_start = resident_mb(server.process.pid)
        generated = server.metric("windowlm_generation_tokens_total")
        time.sleep(5)
        assert server.metric("windowlm_generation_tokens_total") == generated  # paused: nothing more generated
        assert server.metric("windowlm_kv_slots_used") == 24  # but still holding their places
        assert server.wait_metric("windowlm_kv_slots_used", 0, timeout=120) == 0  # past the stall timeout
        assert resident_mb(server.process.pid) - rss_start < 50
        # ended by the engine's stall timeout or by the stream's write timeout, whichever came first
        stalled = server.metric("windowlm_request_failures_total", reason="stalled")
        assert stalled + server.metric("windowlm_request_failures_total", reason="cancelled") == 24
        served = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
        assert served.status_code == 200
        for sock in sockets:  # and their connections were closed: what is left to read ends
            assert read_to_end(sock, timeout=10)
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def test_requests_whose_clients_left_while_queued_never_start(relative_checkpoint) -> None:
    """Queued clients leave at the moment the one slot frees (the running stream's client leaves with them): no
    request of the queue may take the slot. Several rounds, since the old failure was a race."""
    server = ServerProcess(
        relative_checkpoint, "--max-batch-size", "1", "--max-queue", "8", "--max-tokens-limit", "10000000"
    )
    endless = {"model": TEST_MODEL, "prompt": "run", "max_tokens": 10_000_000, "stream": True}
    url = f"{server.url}/v1/completions"
    try:
        for round_ in range(1, 5):
            with httpx.Client(timeout=30) as client, client.stream("POST", url, json=endless) as running:
                lines = running.iter_lines()  # kept: a dropped iterator would close the response
                next(line for line in lines if line.startswith("data: {"))
                admitted = server.metric("windowlm_queue_time_seconds_count")
                queued = [open_without_reading(server, {**endless, "prompt": f"q{i}"}) for i in range(4)]
                queued += [open_without_reading(server, {**endless, "prompt": "whole", "stream": False})]
                assert server.wait_metric("windowlm_requests_waiting", 5) == 5
                for sock in queued:
                    sock.close()
            assert server.wait_metric("windowlm_request_failures_total", 6 * round_, reason="cancelled") == 6 * round_
            assert server.wait_metric("windowlm_requests_waiting", 0) == 0
            assert server.metric("windowlm_kv_slots_used") == 0
            assert server.metric("windowlm_queue_time_seconds_count") == admitted  # none of the queue started
    finally:
        server.stop()
