"""Input as a careless or hostile client sends it: every bad value is a 4xx naming the problem, cheap to refuse,
and the server goes on serving."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import TEST_MODEL, ServerProcess

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def roomy(relative_checkpoint) -> Iterator[ServerProcess]:
    """A body limit above 5 MB, so that a 5 MB body reaches the JSON parser; a 2 s body timeout."""
    flags = ("--max-body-bytes", str(8 * MiB), "--max-tokens-limit", "64", "--body-timeout", "2")
    process = ServerProcess(relative_checkpoint, *flags)
    yield process
    process.stop()


def completion(server: ServerProcess, **fields) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"model": TEST_MODEL, **fields}, timeout=30)


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"], error
    return error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_p", 1e-46),  # > 0 as a double, 0 in float32: killed the engine
        ("repetition_penalty", 1e-39),  # made the logits overflow: a 500
        ("repetition_penalty", 1e-46),
        ("temperature", 3.5),
    ],
)
def test_sampling_values_float32_cannot_carry_are_400_and_the_server_goes_on(
    server: ServerProcess, field: str, value: float
) -> None:
    error = assert_error(completion(server, prompt="Hi", max_tokens=2, **{field: value}), 400, field)
    assert "float32" in error["message"] or field == "temperature", error  # says why, not just a bound
    served = completion(server, prompt="Hi", max_tokens=2)
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_tiny_positive_temperature_is_greedy(server: ServerProcess) -> None:
    greedy = completion(server, prompt="The ", max_tokens=24, temperature=0).json()["choices"][0]["text"]
    for seed in range(3):
        tiny = completion(server, prompt="The ", max_tokens=24, temperature=1e-50, seed=seed)
        assert tiny.json()["choices"][0]["text"] == greedy


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": "Hi", "max_tokens": "10"}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": True}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 10.5}, "max_tokens"),
        ({"prompt": "Hi", "stream": "yes"}, "stream"),
        ({"prompt": "Hi", "stream": 1}, "stream"),
        ({"prompt": "Hi", "echo": "true"}, "echo"),
        ({"prompt": "Hi", "temperature": "0.5"}, "temperature"),
        ({"prompt": [True, False]}, "prompt"),
        ({"prompt": [65, 300]}, "prompt"),
        ({"prompt": [65, -1]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "Hi", "stop": ["ok", 5]}, "stop"),
    ],
)
def test_no_coercion_of_strings_booleans_or_numbers(server: ServerProcess, fields: dict, param: str) -> None:
    assert_error(completion(server, **fields), 400, param)


def raw_post(server: ServerProcess, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=body, headers={"Content-Type": "application/json"}, timeout=30)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),  # a lone surrogate
        ("/v1/completions", b'{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "a\\u0000b"}', "prompt"),  # NUL
        ("/v1/completions", b'{"model": "tiny", "prompt": "caf\xe9"}', "prompt"),  # Latin-1, not UTF-8
        ("/v1/completions", b'{"model": "tiny", "prompt": "Hi", "stop": "\\ud800"}', "stop"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "Hi", "user": "\\udc80"}', "user"),
        ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
        ("/tokenize", b'{"prompt": "\xff\xfe"}', "prompt"),
    ],
)
def test_text_that_is_not_unicode_is_400_naming_the_field(
    server: ServerProcess, path: str, body: bytes, param: str
) -> None:
    assert_error(raw_post(server, path, body), 400, param)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"model": "tiny", "prompt": "Hi",', "line 1 column 34"),
        (b'{"model": "tiny", "prompt": "Hi", "temperature": NaN}', "NaN"),
        (b'{"model": "tiny", "prompt": "Hi", "temperature": 1e999}', "out of range"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'"just a string"', "JSON object"),
    ],
)
def test_malformed_json_names_the_position_and_no_param(server: ServerProcess, body: bytes, words: str) -> None:
    error = assert_error(raw_post(server, "/v1/completions", body), 400, None)
    assert words in error["message"]


def timed_while_health_answers(server: ServerProcess, send) -> tuple[httpx.Response, float, float]:
    """Send a request and, while it is in flight, time /health; -> (response, request seconds, worst /health).
    The request is sent once the prober has its first answer, so the two overlap however busy the machine."""
    health_times: list[float] = []
    done, probing = threading.Event(), threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                started = time.perf_counter()
                client.get(f"{server.url}/health")
                health_times.append(time.perf_counter() - started)
                probing.set()

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        assert probing.wait(30), "/health did not answer"
        started = time.perf_counter()
        response = send()
        elapsed = time.perf_counter() - started
    finally:
        done.set()
        prober.join()
    return response, elapsed, max(health_times)


def test_a_5_mb_list_of_floats_costs_milliseconds(roomy: ServerProcess) -> None:
    body = b'{"model": "tiny", "prompt": [' + b",".join([b"0.5"] * 1_300_000) + b"]}"
    assert len(body) > 5_000_000
    with httpx.Client(timeout=30) as client:
        client.get(f"{roomy.url}/health")  # the connection is open before the clock starts

        def send() -> httpx.Response:
            return client.post(f"{roomy.url}/v1/completions", content=body)

        response, elapsed, worst_health = timed_while_health_answers(roomy, send)
    assert_error(response, 400, None)
    assert "non-integer numbers" in response.json()["error"]["message"]
    assert elapsed < 0.5 + upload_seconds(len(body)), elapsed  # validating each item would take seconds
    assert worst_health < 0.1, worst_health


def upload_seconds(size: int) -> float:
    """Generous time to push `size` bytes through loopback on a busy 2-core machine (about 500 MB/s)."""
    return size / 500e6


def test_a_million_token_ids_are_refused_by_their_count(roomy: ServerProcess) -> None:
    """Refused from the list's length, before any of its items is validated."""
    body = b'{"model": "tiny", "prompt": [' + b",".join([b"65"] * 1_000_000) + b"]}"
    response, _, worst_health = timed_while_health_answers(roomy, lambda: raw_post(roomy, "/v1/completions", body))
    assert_error(response, 400, "prompt")
    assert "at most 65536" in response.json()["error"]["message"]
    assert worst_health < 0.25, worst_health


def test_body_over_the_limit_is_413_before_it_is_read(server: ServerProcess) -> None:
    big = b'{"prompt": "' + b"a" * (10 * MiB) + b'"}'
    started = time.perf_counter()
    response = raw_post(server, "/v1/completions", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert time.perf_counter() - started < 5


def test_chunked_body_over_the_limit_is_413_while_it_is_read(server: ServerProcess) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(20 * 16):  # 20 MB in 64 KB chunks, without Content-Length
            sent += 65536
            yield b"a" * 65536

    try:
        response = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
        assert response.status_code == 413
    except httpx.HTTPError:  # the server may close while the client still writes; what matters is below
        pass
    assert sent < 20 * MiB  # it stopped reading long before the end
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_max_tokens_over_the_server_cap(roomy: ServerProcess, relative_checkpoint) -> None:
    assert_error(completion(roomy, prompt="Hi", max_tokens=10**12), 400, "max_tokens")
    assert_error(completion(roomy, prompt="Hi", max_tokens=65), 400, "max_tokens")
    clamping = ServerProcess(relative_checkpoint, "--max-tokens-limit", "5", "--clamp-max-tokens")
    try:
        clamped = completion(clamping, prompt="Hi", max_tokens=10**12)
        assert clamped.status_code == 200 and clamped.json()["usage"]["completion_tokens"] == 5
    finally:
        clamping.stop()


def test_prompts_times_n_over_the_cap(server: ServerProcess) -> None:
    assert_error(completion(server, prompt=["a"] * 65, max_tokens=1), 400, "prompt")  # 65 prompts: over 64
    assert_error(completion(server, prompt=["a"] * 20, n=4, max_tokens=1), 400, "n")  # 80 sequences


def test_405_carries_allow_and_the_error_shape(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_path_is_404_in_the_error_shape(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_a_request_head_with_too_many_fields_is_431(server: ServerProcess) -> None:
    headers = {f"x-field-{i}": "1" for i in range(120)}
    response = httpx.get(f"{server.url}/health", headers=headers)
    assert response.status_code == 431 and json.loads(response.text)["error"]["message"]


def test_a_half_sent_body_holds_up_nobody_and_is_cut_off(roomy: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", roomy.port)) as sock:
        sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"model"')
        started = time.perf_counter()
        assert completion(roomy, prompt="Hi", max_tokens=2).status_code == 200
        assert time.perf_counter() - started < 5
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed by the server once the body timeout passed
        assert time.perf_counter() - started < 6


def test_many_token_lists_count_together(roomy: ServerProcess) -> None:
    response = completion(roomy, prompt=[[65] * 40_000, [66] * 40_000], max_tokens=1)
    assert_error(response, 400, "prompt")
    assert "80000 tokens" in response.json()["error"]["message"]
    detokenize = httpx.post(f"{roomy.url}/detokenize", json={"tokens": [65] * 70_000}, timeout=30)
    assert_error(detokenize, 400, "tokens")
    tokenize = httpx.post(f"{roomy.url}/tokenize", json={"prompt": "a" * 70_000}, timeout=30)
    assert_error(tokenize, 400, "prompt")
