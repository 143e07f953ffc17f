"""POST /v1/chat/completions: a conversation rendered by the chat template, then the same engine, sampling,
limits and streaming as completions."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from model.chat_template import ChatTemplate, ChatTemplateError
from model.tokenizer import ByteTokenizer
from server.body import json_body
from server.chat_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    TokenLogprob,
    TopLogprob,
    message_text,
)
from server.choices import ChoiceDelta, finite, token_text
from server.choices import TokenLogprob as ScoredToken
from server.config import Settings
from server.errors import InvalidRequest
from server.generation_run import GenerationRun
from server.openapi import error_responses, json_request_body
from server.protocol import check_prompt_tokens
from server.routes.completions import SSE_EVENT, check_model, check_streaming, json_response
from server.sse import EventStreamResponse, sse_data
from server.state import EngineDep, StateDep
from server.submission import GenerationSpec, generation_spec

router = APIRouter()
tokenizer = ByteTokenizer()
STREAM = "A chat completion, or with `stream: true` Server-Sent Events: `data: {chunk}` lines, then `data: [DONE]`"


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses={
        200: {"model": ChatCompletion, "description": STREAM, "content": {"text/event-stream": {"schema": SSE_EVENT}}},
        **error_responses(400, 404, 429),
    },
    openapi_extra=json_request_body(ChatCompletionRequest),
)
async def create_chat_completion(
    body: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
    request: Request,
    state: StateDep,
    engine: EngineDep,
) -> Response:
    served = state.settings.served_model_name()
    check_model(body.model, served)
    check_streaming(body)
    spec = chat_spec(body, state.chat_template, state.settings)
    spec = replace(spec, grammar=await state.grammar_compiler().for_request(body))
    run = GenerationRun.submit(spec, state, engine, request)
    reply = ChatReply(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served)
    if body.stream:
        openers = [
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for index in range(spec.n)
        ]
        events = run.stream(reply.chunk, chat_delta, body.stream_options, state.settings.ping_interval, openers)
        return EventStreamResponse(events, on_close=run.cancel, send_timeout=state.settings.stall_timeout)
    collected = await run.collect(request)
    if isinstance(collected, Response):
        return collected
    answer = ChatCompletion(
        id=reply.id,
        created=reply.created,
        model=served,
        choices=[
            ChatChoice(
                index=choice.index,
                message=AssistantMessage(content=choice.text),
                logprobs=ChoiceLogprobs(content=chat_logprobs(choice.logprobs)) if body.logprobs else None,
                finish_reason=choice.finish_reason,
            )
            for choice in collected
        ],
        usage=run.usage(),
    )
    return json_response(answer)


def chat_spec(body: ChatCompletionRequest, template: ChatTemplate, settings: Settings) -> GenerationSpec:
    """What the chat request asks of the engine, once every field has been checked."""
    refusal = body.refusal()
    if refusal is not None:
        param, why = refusal
        raise InvalidRequest(f"{param}: {why}", param=param)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    prompt = conversation_prompt(body, template, settings)
    max_tokens = body.completion_limit
    if max_tokens is None:
        max_tokens = min(settings.chat_max_tokens, settings.max_tokens_limit)
    return generation_spec(
        body,
        [prompt],
        settings,
        max_tokens=max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        # A byte model's end of turn is a stop string; a constraint ends the reply where its grammar does.
        extra_stop=() if body.ignore_eos or body.constrained else template.stop,
        length_param="max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
    )


def conversation_prompt(body: ChatCompletionRequest, template: ChatTemplate, settings: Settings) -> list[int]:
    """The conversation rendered by the chat template, as token ids within the prompt limit."""
    messages = [
        {"role": message.role, "content": message_text(message), **({"name": message.name} if message.name else {})}
        for message in body.messages
    ]
    try:
        text = template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as error:
        raise InvalidRequest(f"the chat template cannot render this conversation: {error}", param="messages") from None
    prompt = tokenizer.encode(text)
    check_prompt_tokens(len(prompt), settings, "messages")
    if not prompt:
        raise InvalidRequest("the conversation renders to an empty prompt", param="messages")
    return prompt


@dataclass(frozen=True)
class ChatReply:
    id: str
    created: int
    model: str

    def chunk(self, choices: list[dict], extra: dict) -> str:
        payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        return sse_data({**payload, "system_fingerprint": None, "choices": choices, **extra})


def chat_logprobs(tokens: list[ScoredToken]) -> list[TokenLogprob]:
    """The chat shape: each token with its bytes, and the most likely tokens at its position."""
    return [
        TokenLogprob(
            token=token_text(entry.token),
            logprob=finite(entry.logprob if entry.logprob is not None else 0.0),  # chat never echoes: never None
            bytes=[entry.token],
            top_logprobs=[TopLogprob(token=token_text(t), logprob=finite(v), bytes=[t]) for t, v in entry.top],
        )
        for entry in tokens
    ]


def chat_delta(delta: ChoiceDelta) -> dict:
    logprobs = {"content": [t.model_dump() for t in chat_logprobs(delta.logprobs)]} if delta.logprobs else None
    content = {"content": delta.text} if delta.text else {}
    return {"index": delta.index, "delta": content, "logprobs": logprobs, "finish_reason": delta.finish_reason}
