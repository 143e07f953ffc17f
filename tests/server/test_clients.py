"""Client libraries as users run them, unchanged, against a real server: the openai SDK's async client and
langchain-openai's chat and completion models, invoked and streamed, and both asking for structured output."""

from __future__ import annotations

import asyncio
from typing import Literal

import openai
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAI
from pydantic import BaseModel, Field

from tests.server.conftest import TEST_MODEL, ServerProcess


def test_langchain_chat_model_invokes_and_streams(server: ServerProcess) -> None:
    model = ChatOpenAI(
        model=TEST_MODEL, base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_tokens=12, max_retries=0
    )
    messages = [SystemMessage("A street in Verona."), HumanMessage("What news?")]
    answer = model.invoke(messages)
    assert isinstance(answer.content, str) and answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["input_tokens"] > 0
    streamed = "".join(chunk.content for chunk in model.stream(messages))
    assert streamed == answer.content


def test_langchain_completion_model_invokes_and_streams(server: ServerProcess) -> None:
    model = OpenAI(
        model=TEST_MODEL, base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_tokens=12, max_retries=0
    )
    text = model.invoke("To be or not")
    assert isinstance(text, str) and text
    assert "".join(model.stream("To be or not")) == text


def test_the_async_openai_client_streams_chat_concurrently(server: ServerProcess) -> None:
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def one(seed: int) -> str:
            stream = await client.chat.completions.create(
                model=TEST_MODEL,
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=10,
                seed=seed,
                stream=True,
            )
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

        together = await asyncio.gather(*(one(seed) for seed in range(4)))
        alone = [await one(seed) for seed in range(4)]
        await client.close()
        return [together, alone]

    together, alone = asyncio.run(run())
    assert together == alone


class Verdict(BaseModel):
    """What the structured-output clients below ask for: the model knows no JSON, the constraint does it all."""

    mood: Literal["glad", "sad", "wroth"]
    act: int = Field(ge=1, le=5)


def test_the_openai_sdk_parses_a_structured_chat_reply_into_its_model(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(
        model=TEST_MODEL,
        messages=[{"role": "user", "content": "How fares the prince?"}],
        response_format=Verdict,
        temperature=0,
        max_completion_tokens=100,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Verdict)


def test_langchain_structured_output_gives_the_pydantic_model(server: ServerProcess) -> None:
    model = ChatOpenAI(
        model=TEST_MODEL, base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_tokens=100, max_retries=0
    )
    structured = model.with_structured_output(Verdict, method="json_schema")
    assert isinstance(structured.invoke("How fares the prince?"), Verdict)
