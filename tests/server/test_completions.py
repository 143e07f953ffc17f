"""/v1/completions over real HTTP: the official openai client, raw SSE framing, batching and errors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.conftest import TEST_MODEL, ServerProcess


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def stream_text(server: ServerProcess, prompt: str, **params) -> str:
    chunks = client(server).completions.create(model=TEST_MODEL, prompt=prompt, stream=True, **params)
    return "".join(choice.text for chunk in chunks for choice in chunk.choices)


def test_openai_client_non_streaming(server: ServerProcess) -> None:
    completion = client(server).completions.create(model=TEST_MODEL, prompt="To be", max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.model == TEST_MODEL
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.index == 0
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == 17
    assert stream_text(server, "To be", max_tokens=12, temperature=0) == choice.text


def test_openai_client_streaming_with_usage(server: ServerProcess) -> None:
    chunks = list(
        client(server).completions.create(
            model=TEST_MODEL,
            prompt="abc",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    reasons = [choice.finish_reason for chunk in chunks for choice in chunk.choices]
    assert reasons[-1] == "length" and all(reason is None for reason in reasons[:-1])


def test_raw_sse_framing(server: ServerProcess) -> None:
    body = {
        "model": TEST_MODEL,
        "prompt": "hi",
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    raw = b""
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        for byte in response.iter_bytes(chunk_size=1):
            raw += byte
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 6
    for payload in payloads[:-1]:
        assert payload["object"] == "text_completion" and set(payload["choices"][0]) == {
            "index",
            "text",
            "logprobs",
            "finish_reason",
        }


def test_concurrent_greedy_streams_equal_their_text_alone(server: ServerProcess) -> None:
    prompts = [f"prompt number {i}: " + "x" * i for i in range(16)]
    alone = [stream_text(server, prompt, max_tokens=40, temperature=0) for prompt in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: stream_text(server, p, max_tokens=40, temperature=0), prompts))
    assert together == alone
    batches_before = server.metric("windowlm_batch_size_sequences_count")
    over_8_before = batches_before - server.metric("windowlm_batch_size_sequences_bucket", le="8.0")
    # one request of 16 prompts: its sequences are queued together, so the steps surely batch more than 8
    completion = client(server).completions.create(model=TEST_MODEL, prompt=prompts, max_tokens=40, temperature=0)
    assert [choice.text for choice in completion.choices] == alone
    batches = server.metric("windowlm_batch_size_sequences_count")
    over_8 = batches - server.metric("windowlm_batch_size_sequences_bucket", le="8.0")
    assert over_8 > over_8_before


def test_seeded_sampling_is_the_same_alone_and_batched(server: ServerProcess) -> None:
    params = dict(max_tokens=30, temperature=1.0, top_p=0.9, seed=1234)
    alone = stream_text(server, "seeded", **params)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream_text, server, "seeded", **params)]
        futures += [pool.submit(stream_text, server, f"other {i}", max_tokens=30, seed=i) for i in range(7)]
        assert futures[0].result() == alone
    assert stream_text(server, "seeded", **{**params, "seed": 99}) != alone


def test_n_choices_and_echo(server: ServerProcess) -> None:
    completion = client(server).completions.create(
        model=TEST_MODEL, prompt=["ab", "cd"], n=2, max_tokens=5, seed=3, echo=True, logprobs=2
    )
    assert [choice.index for choice in completion.choices] == [0, 1, 2, 3]
    assert completion.choices[0].text.startswith("ab") and completion.choices[2].text.startswith("cd")
    logprobs = completion.choices[1].logprobs  # the echoed prompt's 2 tokens are scored too, the first with null
    assert len(logprobs.tokens) == 7 and len(logprobs.token_logprobs) == 7 and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None and all(2 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])
    assert completion.usage.prompt_tokens == 4 and completion.usage.completion_tokens == 20


def test_token_id_prompts_and_tokenize_round_trip(server: ServerProcess) -> None:
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "héllo"}).json()
    assert tokens["tokens"] == list("héllo".encode()) and tokens["count"] == 6
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "héllo"}
    by_ids = client(server).completions.create(model=TEST_MODEL, prompt=tokens["tokens"], max_tokens=5, temperature=0)
    by_text = client(server).completions.create(model=TEST_MODEL, prompt="héllo", max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_stop_sequence_ends_the_choice_before_it(server: ServerProcess) -> None:
    full = stream_text(server, "stop here", max_tokens=40, temperature=0)
    stop = next(full[i : i + 2] for i in range(5, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    completion = client(server).completions.create(
        model=TEST_MODEL, prompt="stop here", max_tokens=40, temperature=0, stop=[stop]
    )
    assert completion.choices[0].text == full[: full.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_models_endpoint(server: ServerProcess) -> None:
    models = client(server).models.list()
    assert [model.id for model in models.data] == [TEST_MODEL]
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["window_size"] == 8 and card["max_model_len"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"suffix": "and then"}, "suffix"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"logit_bias": {"300": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 100.5}}, "logit_bias"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"n": 50}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": 30}, "logprobs"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 300]}, "prompt"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_parameters_get_400_naming_the_param(server: ServerProcess, body: dict, param: str) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": TEST_MODEL, "prompt": "x", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_unknown_model_and_malformed_json(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    response = httpx.post(
        f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()


def test_prompt_longer_than_an_absolute_model_context(absolute_checkpoint) -> None:
    server = ServerProcess(absolute_checkpoint)
    try:
        body = {"model": TEST_MODEL, "prompt": "x" * 65, "max_tokens": 5}
        response = httpx.post(f"{server.url}/v1/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
        body = {"model": TEST_MODEL, "prompt": "x" * 60, "max_tokens": 50, "temperature": 0}
        choice = httpx.post(f"{server.url}/v1/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"] == 64
    finally:
        server.stop()


def test_a_long_prompt_is_counted_whole_and_read_from_the_models_reach(server: ServerProcess) -> None:
    """The test model (2 layers, window 8, look-back 1) can see 17 tokens back: of a 400-token prompt the
    server reads the last chunk-aligned stretch that covers them, and still counts all 400."""
    counted = server.metric("windowlm_prompt_tokens_total")
    read = server.metric("windowlm_prompt_tokens_read_total")
    client(server).completions.create(model=TEST_MODEL, prompt="y" * 400, max_tokens=1)
    assert server.wait_metric("windowlm_prompt_tokens_total", counted + 400) == counted + 400
    assert 17 <= server.metric("windowlm_prompt_tokens_read_total") - read <= 32
