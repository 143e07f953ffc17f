"""One API request in the engine, whichever endpoint it came through: submission, then its choices' text as
Server-Sent Events or collected whole, with cancellation when the client leaves. The routes only shape JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from server.choices import ChoiceDelta, ChoiceText, GenerationFailed, TokenLogprob, merge_choice_events
from server.engine import Engine, EngineOverloaded, EngineStopped
from server.engine_request import EngineRequest
from server.errors import APIError, InvalidRequest, Overloaded, Unavailable, error_body
from server.http_protocol import PEER_CLOSED
from server.protocol import StreamOptions, Usage
from server.sse import DONE, PING, sse_data
from server.state import ServerState
from server.submission import GenerationSpec, engine_requests


@dataclass
class CollectedChoice:
    """A whole choice, once its sequence has ended."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    total_logprob: float = 0.0


class GenerationRun:
    """The engine requests of one API request (one per candidate) and the text side of each."""

    def __init__(self, spec: GenerationSpec, requests: list[EngineRequest]) -> None:
        self.spec = spec
        self.requests = requests
        self.choices = [
            ChoiceText(
                request.tag,
                spec.stop,
                spec.logprobs,
                echo=request.prompt if spec.echo else None,
                prompt_logprobs=spec.prompt_logprobs is not None,
                min_tokens=spec.min_tokens,
            )
            for request in requests
        ]
        self.prompt_tokens = sum(len(ids) for ids in spec.prompts)  # each prompt counts once, whatever n is

    @classmethod
    def submit(cls, spec: GenerationSpec, state: ServerState, engine: Engine, request: Request) -> GenerationRun:
        """Queue the spec's sequences in the engine (429 when it is full, 503 when it is stopping)."""
        requests = engine_requests(spec, engine, state.settings, asyncio.get_running_loop())
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
        return cls(spec, requests)

    def usage(self) -> Usage:
        """Tokens so far: every candidate's generated tokens count, returned or not."""
        completion_tokens = sum(choice.completion_tokens for choice in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
        )

    def cancel(self) -> None:
        """Free the slots of whatever is still running (finished requests ignore this)."""
        for request in self.requests:
            request.cancel()

    async def stream(
        self,
        chunk: Callable[[list[dict], dict], str],
        choice_json: Callable[[ChoiceDelta], dict],
        options: StreamOptions | None,
        idle_seconds: float,
        openers: Sequence[dict] = (),
    ) -> AsyncIterator[str]:
        """Server-Sent Events: `chunk(choices, extra)` frames one chunk, `choice_json` one choice's delta.

        One choice per chunk, so a client reading `choices[0]` misses nothing. With `include_usage` every chunk
        carries `usage: null` and a last chunk with no choices the request's usage; with
        `continuous_usage_stats` every chunk carries the usage so far."""
        continuous = options is not None and bool(options.continuous_usage_stats)
        include_usage = options is not None and bool(options.include_usage)

        def usage_field() -> dict:
            if continuous:
                return {"usage": self.usage().model_dump()}
            return {"usage": None} if include_usage else {}

        try:
            for opener in openers:
                yield chunk([opener], usage_field())
            async for deltas in merge_choice_events(self.requests, self.choices, idle_seconds):
                if deltas is None:
                    yield PING
                    continue
                for delta in deltas:
                    if delta.changed:
                        yield chunk([choice_json(delta)], usage_field())
        except GenerationFailed as error:
            yield sse_data(error_body(str(error), "invalid_request_error" if error.client_error else "server_error"))
        else:
            if include_usage:
                yield chunk([], {"usage": self.usage().model_dump()})
        yield DONE

    async def collect(self, request: Request) -> list[CollectedChoice] | JSONResponse:
        """Every choice whole, in index order (the `n` best per prompt when there are more candidates); a 499
        response when the client leaves first."""
        collected = {choice.index: CollectedChoice(choice.index) for choice in self.choices}

        async def gather() -> None:
            async for deltas in merge_choice_events(self.requests, self.choices, idle_seconds=3600):
                for delta in deltas or []:
                    collected[delta.index].text += delta.text
                    collected[delta.index].logprobs += delta.logprobs

        gathering = asyncio.ensure_future(gather())
        client_gone = asyncio.ensure_future(wait_for_disconnect(request))
        await asyncio.wait({gathering, client_gone}, return_when=asyncio.FIRST_COMPLETED)
        if not gathering.done():  # the client left: stop generating for it
            gathering.cancel()
            return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
        client_gone.cancel()
        try:
            gathering.result()
        except GenerationFailed as error:
            raise (InvalidRequest if error.client_error else APIError)(str(error)) from error
        for choice in self.choices:
            collected[choice.index].finish_reason = choice.finish_reason
            collected[choice.index].total_logprob = choice.total_logprob
        return self.best([collected[index] for index in sorted(collected)])

    def best(self, candidates: list[CollectedChoice]) -> list[CollectedChoice]:
        """With best_of, the n candidates of each prompt with the highest total logprob of their generated
        tokens, best first, indexed prompt * n + rank; otherwise every candidate as it is."""
        spec = self.spec
        if spec.candidates == spec.n:
            return candidates
        chosen = []
        for prompt in range(len(spec.prompts)):
            group = candidates[prompt * spec.candidates : (prompt + 1) * spec.candidates]
            ranked = sorted(group, key=lambda choice: choice.total_logprob, reverse=True)[: spec.n]
            for rank, choice in enumerate(ranked):
                choice.index = prompt * spec.n + rank
                chosen.append(choice)
        return chosen


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
