"""POST /v1/completions, streamed over Server-Sent Events or answered whole."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

from server.body import json_body
from server.choices import TOKEN_TEXTS, ChoiceDelta, TokenLogprob, finite, token_text
from server.errors import InvalidRequest, NotFound
from server.generation_run import GenerationRun
from server.openapi import error_responses, json_request_body
from server.protocol import Completion, CompletionChoice, CompletionRequest, GenerationRequest, Logprobs
from server.sse import EventStreamResponse, sse_data
from server.state import EngineDep, StateDep
from server.submission import generation_spec, prompt_token_lists

router = APIRouter()
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
) -> Response:
    served = state.settings.served_model_name()
    check_model(body.model, served)
    check_streaming(body)
    if body.suffix:
        raise InvalidRequest("suffix is not supported: this model continues text and cannot insert it", param="suffix")
    prompts = prompt_token_lists(body.prompt, state.settings)
    spec = generation_spec(
        body,
        prompts,
        state.settings,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        echo=bool(body.echo),
        best_of=body.best_of,
    )
    if spec.candidates > spec.n and body.stream:
        raise InvalidRequest("best_of cannot be streamed: candidates are ranked once they are whole", param="best_of")
    spec = replace(spec, grammar=await state.grammar_compiler().for_request(body))
    run = GenerationRun.submit(spec, state, engine, request)
    reply = CompletionReply(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served)
    if body.stream:
        events = run.stream(reply.chunk, completion_delta, body.stream_options, state.settings.ping_interval)
        return EventStreamResponse(events, on_close=run.cancel, send_timeout=state.settings.stall_timeout)
    collected = await run.collect(request)
    if isinstance(collected, Response):
        return collected
    completion = Completion(
        id=reply.id,
        created=reply.created,
        model=served,
        choices=[
            CompletionChoice(
                index=choice.index,
                text=choice.text,
                logprobs=completion_logprobs(choice.logprobs) if spec.logprobs is not None else None,
                finish_reason=choice.finish_reason,
            )
            for choice in collected
        ],
        usage=run.usage(),
    )
    return json_response(completion)


def json_response(body: BaseModel) -> Response:
    """The body as JSON, serialized by pydantic in one call (FastAPI's encoder walks every value in Python: 20x
    slower, and a response with logprobs holds millions of them)."""
    return Response(body.model_dump_json(), media_type="application/json")


def check_model(model: str, served: str) -> None:
    if model != served:
        raise NotFound(f"the model {model!r} does not exist; this server runs {served!r}", param="model")


def check_streaming(body: GenerationRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options needs stream=true", param="stream_options")


@dataclass(frozen=True)
class CompletionReply:
    id: str
    created: int
    model: str

    def chunk(self, choices: list[dict], extra: dict) -> str:
        payload = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        return sse_data({**payload, "choices": choices, **extra})


def completion_logprobs(tokens: list[TokenLogprob]) -> Logprobs:
    """The legacy completions shape. The token itself is always among its position's top logprobs (so a
    position holds up to logprobs + 1), as OpenAI's API reports it; the first token of an echoed prompt has
    null for both."""
    logprobs = Logprobs()
    for entry in tokens:
        logprobs.tokens.append(token_text(entry.token))
        logprobs.text_offset.append(entry.text_offset)
        if entry.logprob is None:
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            continue
        logprob = finite(entry.logprob)
        logprobs.token_logprobs.append(logprob)
        top = {TOKEN_TEXTS[token]: finite(value) for token, value in entry.top}
        top.setdefault(TOKEN_TEXTS[entry.token], logprob)
        logprobs.top_logprobs.append(top)
    return logprobs


def completion_delta(delta: ChoiceDelta) -> dict:
    logprobs = completion_logprobs(delta.logprobs).model_dump() if delta.logprobs else None
    return {"index": delta.index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
