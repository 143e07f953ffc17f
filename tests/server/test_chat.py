"""/v1/chat/completions over real HTTP with the official openai client: the conversation rendered by the chat
template, streaming, n, logprobs in the chat shape, seeds, refusals, and the bundled model answering in turn."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from model.chat_template import ChatTemplate
from tests.server.conftest import TEST_MODEL, ServerProcess

CONVERSATION = [
    {"role": "system", "content": "A street in Verona."},
    {"role": "user", "content": "Good morrow, friend. What news?"},
]


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat(server: ServerProcess, **params) -> openai.types.chat.ChatCompletion:
    return client(server).chat.completions.create(model=TEST_MODEL, messages=CONVERSATION, **params)


def stream_chunks(server: ServerProcess, **params) -> list:
    return list(client(server).chat.completions.create(model=TEST_MODEL, messages=CONVERSATION, stream=True, **params))


def rendered_prompt() -> str:
    return ChatTemplate.default().render(CONVERSATION, add_generation_prompt=True)


def test_a_chat_completion_is_the_completion_of_the_rendered_conversation(server: ServerProcess) -> None:
    answer = chat(server, max_tokens=24, temperature=0)
    assert answer.object == "chat.completion" and answer.model == TEST_MODEL and answer.id.startswith("chatcmpl-")
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.index == 0
    prompt = rendered_prompt()
    same = client(server).completions.create(
        model=TEST_MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=list(ChatTemplate.default().stop)
    )
    assert choice.message.content == same.choices[0].text and choice.finish_reason == same.choices[0].finish_reason
    assert answer.usage.prompt_tokens == len(prompt.encode()) == same.usage.prompt_tokens
    assert answer.usage.completion_tokens == same.usage.completion_tokens


def test_streamed_chat_opens_with_the_role_and_adds_up_to_the_whole_answer(server: ServerProcess) -> None:
    answer = chat(server, max_tokens=24, temperature=0)
    whole = answer.choices[0]
    chunks = stream_chunks(server, max_tokens=24, temperature=0, stream_options={"include_usage": True})
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.message.content
    reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert reasons[-1] == whole.finish_reason and all(reason is None for reason in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_each_stream_chunk_carries_one_choice(server: ServerProcess) -> None:
    chunks = stream_chunks(server, max_tokens=16, n=3, seed=5)
    assert all(len(chunk.choices) == 1 for chunk in chunks)
    texts = {index: "" for index in range(3)}
    finished = set()
    for chunk in chunks:
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finished.add(choice.index)
    assert finished == {0, 1, 2}
    whole = chat(server, max_tokens=16, n=3, seed=5)
    assert [choice.message.content for choice in whole.choices] == [texts[0], texts[1], texts[2]]


def test_logprobs_in_the_chat_shape(server: ServerProcess) -> None:
    answer = chat(server, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 10
    for entry in content:
        assert len(entry.bytes) == 1 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the token is the most likely
    scored = client(server).completions.create(
        model=TEST_MODEL, prompt=rendered_prompt(), max_tokens=10, temperature=0, logprobs=0
    )
    assert [entry.logprob for entry in content] == scored.choices[0].logprobs.token_logprobs
    assert chat(server, max_tokens=4).choices[0].logprobs is None


def test_seeded_chat_is_the_same_alone_and_batched(server: ServerProcess) -> None:
    params = {"max_tokens": 30, "temperature": 1.0, "seed": 1234}
    alone = chat(server, **params).choices[0].message.content
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(chat, server, **params)]
        futures += [pool.submit(chat, server, max_tokens=30, seed=i) for i in range(5)]
        assert futures[0].result().choices[0].message.content == alone


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format.json_schema.schema",
        ),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}] * 4097}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ],
)
def test_what_the_model_cannot_do_is_a_400_naming_the_param(server: ServerProcess, extra: dict, param: str) -> None:
    body = {"model": TEST_MODEL, "messages": CONVERSATION, **extra}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_null_means_the_default_for_every_optional_chat_field(server: ServerProcess) -> None:
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
        "max_tokens",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "audio",
        "modalities",
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "prediction",
        "web_search_options",
        "store",
        "metadata",
        "service_tier",
        "reasoning_effort",
        "verbosity",
        "prompt_cache_key",
        "safety_identifier",
    ]
    body = {"model": TEST_MODEL, "messages": CONVERSATION, "max_completion_tokens": 4, **dict.fromkeys(optional)}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_list_content_and_names_render_like_plain_text(server: ServerProcess) -> None:
    parts = [
        {
            "role": "user",
            "name": "ROMEO",
            "content": [{"type": "text", "text": "Good"}, {"type": "text", "text": "morrow"}],
        }
    ]
    plain = [{"role": "user", "name": "ROMEO", "content": "Good\nmorrow"}]
    answers = [
        httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": TEST_MODEL, "messages": messages, "max_tokens": 8, "temperature": 0},
        ).json()
        for messages in (parts, plain)
    ]
    assert answers[0]["choices"] == answers[1]["choices"]
    assert answers[0]["usage"]["prompt_tokens"] == len(ChatTemplate.default().render(plain).encode())


def test_unknown_fields_inside_messages_are_named_too(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}], "weight": 1}]
    body = {"model": TEST_MODEL, "messages": messages, "max_tokens": 2}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-windowlm-ignored-fields"] == "messages[0].content[0].cache_control, messages[0].weight"


def test_the_models_endpoint_says_which_chat_template_is_used(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["chat_template"] == "default"


def test_the_bundled_model_answers_in_character_and_stops_at_the_next_speaker(bundled: ServerProcess) -> None:
    answer = chat(bundled, max_tokens=400, temperature=0.7, seed=7)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice.message.content  # the blank line that ends a speech
    assert choice.message.content.strip() and "\n\n" not in choice.message.content
    raw = httpx.post(
        f"{bundled.url}/v1/chat/completions",
        json={
            "model": TEST_MODEL,
            "messages": CONVERSATION,
            "max_tokens": 400,
            "temperature": 0.7,
            "seed": 7,
            "stream": True,
        },
    )
    events = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: {")]
    streamed = "".join(event["choices"][0]["delta"].get("content", "") for event in events)
    assert streamed == choice.message.content
