"""From a validated completion request to engine requests, and from engine events back to text.

The engine yields token ids; here each choice turns them into text (incremental UTF-8, stop sequences,
logprobs), and `run_choices` merges the events of all choices of one HTTP request into deltas.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from model.sampling import SamplingError, SamplingParams
from model.tokenizer import ByteTokenizer, IncrementalDecoder
from server.config import Settings
from server.engine import Engine
from server.engine_request import EngineRequest, FinishEvent, TokenEvent
from server.errors import InvalidRequest
from server.protocol import CompletionRequest, Logprobs, check_prompt_tokens
from server.stop_matcher import StopMatcher

tokenizer = ByteTokenizer()
LOWEST_LOGPROB = -9999.0  # JSON has no -Infinity: a token of probability 0 in float32 reports this


def prompt_token_lists(prompt: str | list, settings: Settings) -> list[list[int]]:
    """The request's validated prompt as one or more lists of token ids, within the server's length limit."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = [tokenizer.encode(item) if isinstance(item, str) else item for item in prompt]
    check_prompt_tokens(sum(len(ids) for ids in prompts), settings, "prompt")
    return prompts


def sampling_params(body: CompletionRequest, choice: int) -> SamplingParams:
    """Sampling parameters of one choice; with a seed, choice i uses seed + i so choices differ."""

    def given(value, default):
        return default if value is None else value

    params = SamplingParams(
        temperature=given(body.temperature, 1.0),
        top_k=max(0, given(body.top_k, 0)),
        top_p=given(body.top_p, 1.0),
        min_p=given(body.min_p, 0.0),
        repetition_penalty=given(body.repetition_penalty, 1.0),
        presence_penalty=given(body.presence_penalty, 0.0),
        frequency_penalty=given(body.frequency_penalty, 0.0),
        seed=None if body.seed is None else (body.seed + choice) % 2**64,
        logprobs=given(body.logprobs, 0),
    )
    try:
        params.validate()
    except SamplingError as error:
        raise InvalidRequest(str(error), param=error.param) from error
    return params


def generation_length(body: CompletionRequest, settings: Settings) -> int:
    """max_tokens, within the server's limit (over it: 400, or the limit when the server clamps)."""
    wanted = 16 if body.max_tokens is None else body.max_tokens
    if wanted <= settings.max_tokens_limit:
        return wanted
    if settings.clamp_max_tokens:
        return settings.max_tokens_limit
    raise InvalidRequest(f"max_tokens must be at most {settings.max_tokens_limit}", param="max_tokens")


def engine_requests(
    body: CompletionRequest, engine: Engine, settings: Settings, loop: asyncio.AbstractEventLoop
) -> tuple[list[list[int]], list[EngineRequest]]:
    """Validate the request against the model and the server's limits, and build one engine request per choice,
    sharing one queue."""
    if body.n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}", param="n")
    max_tokens = generation_length(body, settings)
    prompts = prompt_token_lists(body.prompt, settings)
    limit = engine.context_limit
    for ids in prompts:
        if limit is not None and len(ids) > limit:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; this model's context is {limit} tokens", param="prompt"
            )
    sequences = len(prompts) * body.n
    if sequences > settings.max_sequences:
        raise InvalidRequest(
            f"{len(prompts)} prompts x n={body.n} is {sequences} sequences; at most {settings.max_sequences}", param="n"
        )
    if sequences > engine.max_batch_size + engine.max_queue:
        raise InvalidRequest(
            f"{len(prompts)} prompts x n={body.n} sequences can never fit this server's "
            f"{engine.max_batch_size} slots and {engine.max_queue} queue places",
            param="n",
        )
    events: asyncio.Queue = asyncio.Queue()
    requests = []
    for prompt_index, ids in enumerate(prompts):
        for sample in range(body.n):
            index = prompt_index * body.n + sample
            params = sampling_params(body, index)
            requests.append(EngineRequest(ids, params, max_tokens, loop, events, tag=index))
    return prompts, requests


def token_text(token: int) -> str:
    """A byte token as text for logprobs: the character when it is one, else `bytes:\\xNN`."""
    return chr(token) if token < 0x80 else f"bytes:\\x{token:02x}"


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    logprobs: Logprobs | None = None
    finish_reason: str | None = None


@dataclass
class ChoiceText:
    """One choice's text so far: incremental UTF-8 decoding, stop sequences and logprobs."""

    index: int
    stop: list[str]
    want_logprobs: bool
    text_offset: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    decoder: IncrementalDecoder = field(default_factory=IncrementalDecoder)

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.stop)

    def on_token(self, event: TokenEvent, delta: ChoiceDelta) -> None:
        self.completion_tokens += 1
        text, stopped = self.matcher.push(self.decoder.push(event.token))
        if self.want_logprobs:
            logprobs = delta.logprobs if delta.logprobs is not None else Logprobs()
            logprobs.tokens.append(token_text(event.token))
            logprobs.token_logprobs.append(max(event.logprob, LOWEST_LOGPROB))
            logprobs.top_logprobs.append(
                {token_text(token): max(value, LOWEST_LOGPROB) for token, value in event.top_logprobs}
            )
            logprobs.text_offset.append(self.text_offset)
            delta.logprobs = logprobs
        self.text_offset += len(text)
        delta.text += text
        if stopped:
            self.finish_reason = delta.finish_reason = "stop"

    def on_length(self, delta: ChoiceDelta) -> None:
        """The engine ended the sequence at max_tokens or the context limit: release what was held back."""
        text, stopped = self.matcher.push(self.decoder.flush())
        if not stopped:
            text += self.matcher.flush()
        self.text_offset += len(text)
        delta.text += text
        self.finish_reason = delta.finish_reason = "stop" if stopped else "length"


class GenerationFailed(Exception):
    """A sequence failed in the engine (its logits were not finite, or the server is going away)."""


async def run_choices(
    requests: list[EngineRequest], choices: list[ChoiceText], idle_seconds: float
) -> AsyncIterator[list[ChoiceDelta] | None]:
    """Merge the events of every choice into lists of deltas; None after about `idle_seconds` without events.

    A choice that meets a stop sequence is cancelled in the engine at once. The engine requests are cancelled
    when the iteration ends for any reason (client gone, error), so their slots are freed.
    """
    events = requests[0].events
    open_choices = {choice.index for choice in choices}
    by_index = {choice.index: choice for choice in choices}
    requests_by_index = {request.tag: request for request in requests}
    heartbeat = asyncio.ensure_future(beat(events, idle_seconds))
    loop = asyncio.get_running_loop()
    last_event = loop.time()
    try:
        while open_choices:
            items = [await events.get()]
            while not events.empty():
                items.append(events.get_nowait())
            if all(item is IDLE for item in items):
                if loop.time() - last_event >= idle_seconds:
                    last_event = loop.time()
                    yield None
                continue
            last_event = loop.time()
            deltas: dict[int, ChoiceDelta] = {}
            for item in items:
                if item is IDLE:
                    continue
                index, event = item
                if isinstance(event, TokenEvent):
                    requests_by_index[index].mark_delivered(1)
                if index not in open_choices:
                    continue
                choice, delta = by_index[index], deltas.setdefault(index, ChoiceDelta(index))
                if isinstance(event, TokenEvent):
                    choice.on_token(event, delta)
                elif isinstance(event, FinishEvent):
                    if event.reason == "error":
                        raise GenerationFailed(event.message or "generation failed")
                    choice.on_length(delta)
                if choice.finish_reason is not None:
                    open_choices.discard(index)
                    requests_by_index[index].stop()
            yield [deltas[index] for index in sorted(deltas)]
    finally:
        heartbeat.cancel()
        for request in requests:
            request.cancel()


IDLE = object()  # put on a request's event queue at every beat, so a stream waiting for tokens can ping


async def beat(events: asyncio.Queue, seconds: float) -> None:
    """One timer per stream (not one per token): wake the stream's reader every `seconds` it has nothing to
    read (a reader that is not reading does not need more wake-ups queued)."""
    while True:
        await asyncio.sleep(seconds)
        if events.empty():
            events.put_nowait(IDLE)
