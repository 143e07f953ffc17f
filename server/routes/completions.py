"""POST /v1/completions, streamed over Server-Sent Events or answered whole."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from model.tokenizer import ByteTokenizer
from server.body import json_body
from server.choices import ChoiceDelta, ChoiceText, GenerationFailed, merge_choice_events
from server.engine import EngineOverloaded, EngineStopped
from server.engine_request import EngineRequest
from server.errors import APIError, InvalidRequest, NotFound, Overloaded, Unavailable, error_body
from server.http_protocol import PEER_CLOSED
from server.openapi import error_responses, json_request_body
from server.protocol import Completion, CompletionChoice, CompletionRequest, Logprobs, Usage
from server.sse import DONE, PING, EventStreamResponse, sse_data
from server.state import EngineDep, StateDep
from server.submission import engine_requests

router = APIRouter()
tokenizer = ByteTokenizer()
SSE_EVENT = {  # one Server-Sent Event: `data` holds a completion chunk as JSON, an error object, or [DONE]
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
STREAM = "A completion, or with `stream: true` Server-Sent Events: `data: {chunk}` lines, then `data: [DONE]`"


@router.post(
    "/v1/completions",
    response_model=None,
    responses={
        200: {"model": Completion, "description": STREAM, "content": {"text/event-stream": {"schema": SSE_EVENT}}},
        **error_responses(400, 404, 429),
    },
    openapi_extra=json_request_body(CompletionRequest),
)
async def create_completion(
    body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
    request: Request,
    state: StateDep,
    engine: EngineDep,
) -> Response | Completion:
    served = state.settings.served_model_name()
    if body.model != served:
        raise NotFound(f"the model {body.model!r} does not exist; this server runs {served!r}", param="model")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options needs stream=true", param="stream_options")
    prompts, requests = engine_requests(body, engine, state.settings, asyncio.get_running_loop())
    peer_closed = request.scope.get("extensions", {}).get(PEER_CLOSED)  # see server/http_protocol.py
    for engine_request in requests:
        engine_request.peer_closed = peer_closed
    try:
        engine.submit(requests)
    except EngineOverloaded as error:
        state.metrics.failed("overloaded")
        raise Overloaded(f"the server is at capacity ({error}); retry later", code="overloaded") from error
    except EngineStopped as error:
        raise Unavailable(str(error)) from error

    prompt_texts = [tokenizer.decode(ids) for ids in prompts] if body.echo else [""] * len(prompts)
    echo = [prompt_texts[request_.tag // body.n] for request_ in requests]
    want_logprobs = body.logprobs is not None
    choices = [
        ChoiceText(r.tag, body.stop, want_logprobs, text_offset=len(e)) for r, e in zip(requests, echo, strict=True)
    ]
    reply = CompletionReply(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=served,
        prompt_tokens=sum(len(ids) for ids in prompts),  # each prompt counts once, whatever n is
        echo=echo,
    )
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = reply.stream(requests, choices, state.settings.ping_interval, include_usage)
        stall = state.settings.stall_timeout
        return EventStreamResponse(events, on_close=lambda: cancel_all(requests), send_timeout=stall)
    return await reply.complete(requests, choices, request)


class CompletionReply:
    """Builds the response objects of one completion request, whole or as stream chunks."""

    def __init__(self, *, id: str, created: int, model: str, prompt_tokens: int, echo: list[str]) -> None:
        self.id, self.created, self.model = id, created, model
        self.prompt_tokens = prompt_tokens
        self.echo = echo

    def usage(self, choices: list[ChoiceText]) -> Usage:
        completion_tokens = sum(choice.completion_tokens for choice in choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )

    def chunk(self, choices: list[dict], **extra) -> str:
        payload = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        return sse_data({**payload, "choices": choices, **extra})

    async def stream(
        self, requests: list[EngineRequest], choices: list[ChoiceText], idle_seconds: float, include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            if any(self.echo):
                yield self.chunk([delta_dict(ChoiceDelta(c.index, self.echo[i])) for i, c in enumerate(choices)])
            async for deltas in merge_choice_events(requests, choices, idle_seconds):
                if deltas is None:
                    yield PING
                    continue
                changed = [delta_dict(delta) for delta in deltas if delta.text or delta.finish_reason or delta.logprobs]
                if changed:  # a token that only began a multi-byte character changes nothing yet
                    yield self.chunk(changed)
        except GenerationFailed as error:
            yield sse_data(error_body(str(error), "server_error"))
        else:
            if include_usage:
                yield self.chunk([], usage=self.usage(choices).model_dump())
        yield DONE

    async def complete(
        self, requests: list[EngineRequest], choices: list[ChoiceText], request: Request
    ) -> Completion | Response:
        texts = {choice.index: [self.echo[i]] for i, choice in enumerate(choices)}
        logprobs = {choice.index: Logprobs() if choice.want_logprobs else None for choice in choices}

        async def collect() -> None:
            async for deltas in merge_choice_events(requests, choices, idle_seconds=3600):
                for delta in deltas or []:
                    texts[delta.index].append(delta.text)
                    if delta.logprobs is not None:
                        merge_logprobs(logprobs[delta.index], delta.logprobs)

        collecting = asyncio.ensure_future(collect())
        client_gone = asyncio.ensure_future(wait_for_disconnect(request))
        await asyncio.wait({collecting, client_gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collecting.done():  # the client left: stop generating for it
            collecting.cancel()
            return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
        client_gone.cancel()
        try:
            collecting.result()
        except GenerationFailed as error:
            raise APIError(str(error)) from error
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=choice.index,
                    text="".join(texts[choice.index]),
                    logprobs=logprobs[choice.index],
                    finish_reason=choice.finish_reason,
                )
                for choice in choices
            ],
            usage=self.usage(choices),
        )


def cancel_all(requests: list[EngineRequest]) -> None:
    """Free the slots of whatever is still running (finished requests ignore this)."""
    for request in requests:
        request.cancel()


def delta_dict(delta: ChoiceDelta) -> dict:
    logprobs = None if delta.logprobs is None else delta.logprobs.model_dump()
    return {"index": delta.index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}


def merge_logprobs(total: Logprobs, part: Logprobs) -> None:
    total.tokens += part.tokens
    total.token_logprobs += part.token_logprobs
    total.top_logprobs += part.top_logprobs
    total.text_offset += part.text_offset


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
