"""From engine events back to text: each choice of a request turns its token ids into text (incremental UTF-8,
stop sequences, logprobs with their text offsets), and `merge_choice_events` merges the events of all the
choices of one request into deltas. The HTTP routes and `windowlm generate` share this code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from model.tokenizer import IncrementalDecoder
from server.engine_request import EngineRequest, FinishEvent, TokenEvent
from server.protocol import Logprobs
from server.stop_matcher import StopMatcher

LOWEST_LOGPROB = -9999.0  # JSON has no -Infinity: a token of probability 0 in float32 reports this


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
    """One choice's text so far: incremental UTF-8 decoding, stop sequences and logprobs.

    A token's `text_offset` is where its character begins in the choice's text (after the echoed prompt, which
    is where counting starts): the bytes of one character share its offset, and text held back by the stop
    matcher is counted where it stands, before it is emitted."""

    index: int
    stop: list[str]
    want_logprobs: bool
    text_offset: int = 0  # where the next decoded character begins
    completion_tokens: int = 0
    finish_reason: str | None = None
    decoder: IncrementalDecoder = field(default_factory=IncrementalDecoder)

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.stop)

    def on_token(self, event: TokenEvent, delta: ChoiceDelta) -> None:
        self.completion_tokens += 1
        offset = self.text_offset  # where the token's character begins, held back or not
        piece = self.decoder.push(event.token)
        self.text_offset += len(piece)
        text, stopped = self.matcher.push(piece)
        if self.want_logprobs:
            logprobs = delta.logprobs if delta.logprobs is not None else Logprobs()
            logprobs.tokens.append(token_text(event.token))
            logprobs.token_logprobs.append(max(event.logprob, LOWEST_LOGPROB))
            logprobs.top_logprobs.append(
                {token_text(token): max(value, LOWEST_LOGPROB) for token, value in event.top_logprobs}
            )
            logprobs.text_offset.append(offset)
            delta.logprobs = logprobs
        delta.text += text
        if stopped:
            self.finish_reason = delta.finish_reason = "stop"

    def on_length(self, delta: ChoiceDelta) -> None:
        """The engine ended the sequence at max_tokens or the context limit: release what was held back."""
        text, stopped = self.matcher.push(self.decoder.flush())
        if not stopped:
            text += self.matcher.flush()
        delta.text += text
        self.finish_reason = delta.finish_reason = "stop" if stopped else "length"


class GenerationFailed(Exception):
    """A sequence failed in the engine (its logits were not finite, or the server is going away)."""


async def merge_choice_events(
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
                    requests_by_index[index].reached_stop_sequence()
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
