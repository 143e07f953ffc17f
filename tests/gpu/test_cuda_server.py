"""The engine and the HTTP server on `--device cuda`: one streamed completion end to end in the default dtype
(bfloat16 on CUDA), and in float32 a batch of choices that each give their text alone, plus a constrained one."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from server.config import BUNDLED_WEIGHTS
from tests.gpu.conftest import DEVICE
from tests.server.conftest import TEST_MODEL, ServerProcess


@pytest.fixture(scope="module")
def cuda_server() -> Iterator[ServerProcess]:
    process = ServerProcess(BUNDLED_WEIGHTS, "--device", DEVICE.type)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def cuda_float32_server() -> Iterator[ServerProcess]:
    process = ServerProcess(BUNDLED_WEIGHTS, "--device", DEVICE.type, "--dtype", "float32")
    yield process
    process.stop()


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_one_stream_end_to_end_in_the_default_dtype(cuda_server: ServerProcess) -> None:
    stream = client(cuda_server).completions.create(
        model=TEST_MODEL,
        prompt="ROMEO:",
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert chunks[-1].usage.completion_tokens == 64
    assert len(text.encode("utf-8", "replace")) >= 60  # bytes, less any incomplete character at the end
    assert cuda_server.metric("windowlm_generation_tokens_total") >= 64


def test_batched_choices_give_their_text_alone_and_a_constraint_holds(cuda_float32_server: ServerProcess) -> None:
    api = client(cuda_float32_server)
    alone = [
        api.completions.create(model=TEST_MODEL, prompt="JULIET:", max_tokens=40, seed=seed, temperature=1.0)
        .choices[0]
        .text
        for seed in (10, 11, 12)
    ]
    batched = api.completions.create(model=TEST_MODEL, prompt="JULIET:", max_tokens=40, seed=10, n=3, temperature=1.0)
    assert [choice.text for choice in batched.choices] == alone
    schema = {"type": "object", "properties": {"mood": {"enum": ["glad", "sad"]}}, "required": ["mood"]}
    constrained = api.completions.create(
        model=TEST_MODEL,
        prompt="JULIET:",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "m", "schema": schema}}},
    )
    assert constrained.choices[0].finish_reason == "stop"
    assert json.loads(constrained.choices[0].text)["mood"] in ("glad", "sad")
