"""The completions request surface as clients send it, over real HTTP: null for every optional field, unknown
fields ignored and named, logit_bias, best_of, min_tokens, max_tokens 0, usage on every chunk, one choice per
chunk, signed 64-bit seeds, and the exact bodies benchmark tools send."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from server.choices import token_text
from tests.server.conftest import TEST_MODEL, ServerProcess

# What benchmark tools send, field for field (their request builders, written out as data).
GUIDELLM_COMPLETIONS = {
    "model": TEST_MODEL,
    "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_tokens": 12,
    "stop": None,
    "ignore_eos": True,
    "prompt": "the benchmark prompt",
}
GUIDELLM_CHAT = {
    "model": TEST_MODEL,
    "stream": True,
    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    "max_completion_tokens": 12,
    "stop": None,
    "ignore_eos": True,
    "messages": [
        {"role": "system", "content": "a prefix"},
        {"role": "user", "content": [{"type": "text", "text": "the benchmark prompt"}]},
    ],
}
AIPERF_CHAT = {  # with aiperf's advice `--extra-inputs ignore_eos:true --extra-inputs min_tokens:12`
    "messages": [{"role": "user", "name": "text", "content": "the benchmark prompt"}],
    "model": TEST_MODEL,
    "stream": True,
    "max_completion_tokens": 12,
    "ignore_eos": True,
    "min_tokens": 12,
    "stream_options": {"include_usage": True},
}
AIPERF_COMPLETIONS = {
    "prompt": "the benchmark prompt",
    "model": TEST_MODEL,
    "stream": True,
    "max_tokens": 12,
    "ignore_eos": True,
    "stream_options": {"include_usage": True},
}


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(server: ServerProcess, **body) -> dict:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": TEST_MODEL, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(server: ServerProcess, path: str, body: dict) -> list[dict]:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", GUIDELLM_COMPLETIONS),
        ("/v1/chat/completions", GUIDELLM_CHAT),
        ("/v1/chat/completions", AIPERF_CHAT),
        ("/v1/completions", AIPERF_COMPLETIONS),
    ],
)
def test_benchmark_tool_bodies_stream_tokens(server: ServerProcess, path: str, body: dict) -> None:
    events = sse_events(server, path, body)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    texts = [c.get("text") or c.get("delta", {}).get("content") or "" for e in events for c in e["choices"]]
    assert "".join(texts)
    continuous = body["stream_options"].get("continuous_usage_stats", False)
    usages = [event["usage"] for event in events[:-1]]
    if continuous:  # the usage so far on every chunk, never going down
        counts = [usage["completion_tokens"] for usage in usages]
        assert counts == sorted(counts) and counts[-1] == 12
    else:
        assert usages == [None] * len(usages)


def test_null_means_the_default_for_every_optional_completion_field(server: ServerProcess) -> None:
    optional = [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "stop",
        "seed",
        "n",
        "stream",
        "stream_options",
        "user",
        "logit_bias",
        "ignore_eos",
        "min_tokens",
        "echo",
        "logprobs",
        "best_of",
        "suffix",
    ]
    body = complete(server, prompt="abc", max_tokens=None, **dict.fromkeys(optional))
    assert body["usage"]["completion_tokens"] == 16 and len(body["choices"]) == 1  # OpenAI's default max_tokens


def test_unknown_fields_are_ignored_named_and_counted(server: ServerProcess) -> None:
    before = server.metric("windowlm_requests_with_unknown_fields_total", endpoint="/v1/completions")
    body = {"model": TEST_MODEL, "prompt": "abc", "max_tokens": 3, "frobnicate": 1, "stream_options": None}
    body["priority"] = 5
    response = httpx.post(f"{server.url}/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-windowlm-ignored-fields"] == "frobnicate, priority"
    after = server.wait_metric("windowlm_requests_with_unknown_fields_total", before + 1, endpoint="/v1/completions")
    assert after == before + 1
    plain = httpx.post(f"{server.url}/v1/completions", json={"model": TEST_MODEL, "prompt": "abc", "max_tokens": 3})
    assert "x-windowlm-ignored-fields" not in plain.headers
    odd = {" x ": 2, "é\n": 3, "y" * 100: 4, "": 1}  # names a header cannot hold as they are
    response = httpx.post(f"{server.url}/detokenize", json={"tokens": [104, 105], **odd})
    assert response.status_code == 200 and response.json() == {"prompt": "hi"}
    named = '" x ", "\\u00e9\\n", ' + json.dumps("y" * 64) + ', ""'
    assert response.headers["x-windowlm-ignored-fields"] == named


def test_known_fields_keep_their_types(server: ServerProcess) -> None:
    for field, value in (("ignore_eos", "yes"), ("min_tokens", "3"), ("best_of", True), ("echo", 1)):
        response = httpx.post(f"{server.url}/v1/completions", json={"model": TEST_MODEL, "prompt": "abc", field: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_a_strict_server_refuses_unknown_fields(relative_checkpoint: Path) -> None:
    strict = ServerProcess(relative_checkpoint, "--reject-unknown-fields")
    try:
        body = {"model": TEST_MODEL, "prompt": "abc", "stream_options": {"include_usage": True, "extra": 1}}
        response = httpx.post(f"{strict.url}/v1/completions", json={**body, "stream": True})
        assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options.extra"
    finally:
        strict.stop()


def test_logit_bias_forces_and_bans_tokens(server: ServerProcess) -> None:
    forced = complete(server, prompt="abc", max_tokens=12, seed=1, logit_bias={str(ord("q")): 100})
    assert forced["choices"][0]["text"] == "q" * 12
    greedy = complete(server, prompt="abc", max_tokens=12, temperature=0, logprobs=0)["choices"][0]["logprobs"]
    banned = set(greedy["tokens"])  # the token texts of every byte greedy decoding picks
    bias = {str(token): -100 for token in range(256) if token_text(token) in banned}
    biased = complete(server, prompt="abc", max_tokens=12, temperature=0, logprobs=0, logit_bias=bias)
    tokens = biased["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 12 and not set(tokens) & banned


def test_best_of_returns_the_candidates_with_the_highest_total_logprob(server: ServerProcess) -> None:
    params = {"prompt": "best", "max_tokens": 10, "temperature": 1.0, "logprobs": 0}
    candidates = [complete(server, **params, seed=40 + i)["choices"][0] for i in range(4)]
    totals = [sum(choice["logprobs"]["token_logprobs"]) for choice in candidates]
    ranked = [candidates[i]["text"] for i in sorted(range(4), key=lambda i: totals[i], reverse=True)]
    best = complete(server, **params, seed=40, n=2, best_of=4)
    assert [choice["text"] for choice in best["choices"]] == ranked[:2]
    assert [choice["index"] for choice in best["choices"]] == [0, 1]
    assert best["usage"]["completion_tokens"] == 40  # every candidate was generated


def test_min_tokens_keeps_a_stop_sequence_from_ending_the_choice_early(server: ServerProcess) -> None:
    text = complete(server, prompt="xyz", max_tokens=20, temperature=0)["choices"][0]["text"]
    stop = text[1:3]
    early = complete(server, prompt="xyz", max_tokens=20, temperature=0, stop=[stop])["choices"][0]
    late = complete(server, prompt="xyz", max_tokens=20, temperature=0, stop=[stop], min_tokens=4)["choices"][0]
    assert early["text"] == text[:1] and early["finish_reason"] == "stop"
    assert late["text"].startswith(text[:4]) and len(late["text"]) > len(early["text"])


def test_each_completion_stream_chunk_carries_one_choice(server: ServerProcess) -> None:
    events = sse_events(
        server, "/v1/completions", {"model": TEST_MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 9, "stream": True}
    )
    assert all(len(event["choices"]) == 1 for event in events)
    assert {event["choices"][0]["index"] for event in events if event["choices"][0]["finish_reason"]} == {0, 1, 2, 3}


def test_seeds_span_the_signed_64_bit_range(server: ServerProcess) -> None:
    for seed in (-(2**63), 2**63 - 1):
        assert complete(server, prompt="abc", max_tokens=2, seed=seed, n=2)["choices"]


def test_prompt_scores_are_bounded_by_their_size_in_the_response(server: ServerProcess) -> None:
    body = {"model": TEST_MODEL, "prompt": "x" * 30000, "max_tokens": 0, "echo": True, "logprobs": 20}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)  # 30,000 x 21 values > 524,288
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"
    assert "at most 524288" in response.json()["error"]["message"]
    scored = complete(server, **{**body, "prompt": "x" * 500})  # 10,500 values
    assert 20 <= len(scored["choices"][0]["logprobs"]["top_logprobs"][1]) <= 21
