"""From engine events back to text: each choice of a request turns its token ids into text (incremental UTF-8,
stop sequences, logprobs with their text offsets), and `merge_choice_events` merges the events of all the
choices of one request into deltas. The HTTP routes and `windowlm generate` share this code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from model.tokenizer import IncrementalDecoder
from server.engine_request import EngineRequest, FinishEvent, PromptLogprobsEvent, TokenEvent
from server.stop_matcher import StopMatcher

LOWEST_LOGPROB = -9999.0  # JSON has no -Infinity: a token of probability 0 in float32 reports this


def token_text(token: int) -> str:
    """A byte token as text for logprobs: the character when it is one, else `bytes:\\xNN`."""
    return TOKEN_TEXTS[token]


TOKEN_TEXTS = [chr(token) if token < 0x80 else f"bytes:\\x{token:02x}" for token in range(256)]


def finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


@dataclass
class TokenLogprob:
    """One token of a choice's text with its logprob under the model's raw distribution."""

    token: int
    logprob: float | None  # None for the first token of an echoed prompt: nothing predicts it
    top: list[tuple[int, float]]  # the most likely tokens at its position, best first
    text_offset: int  # where the token's character begins in the choice's text


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def changed(self) -> bool:
        """Whether a client learns anything from it (a token that only began a character changes nothing)."""
        return bool(self.text or self.logprobs or self.finish_reason)


@dataclass
class ChoiceText:
    """One choice's text so far: the echoed prompt, incremental UTF-8 decoding, stop sequences and logprobs.

    A token's `text_offset` is where its character begins in the choice's text (the echoed prompt included):
    the bytes of one character share its offset, and a byte that cannot be part of one is the U+FFFD it becomes.
    A generated token's logprob goes out with its text: while the stop matcher holds the text back, so does it
    wait, and the tokens of a stop sequence, which the text leaves out, leave out their logprobs too. No stop
    sequence ends the choice within its first `min_tokens` tokens: their text bypasses the matcher, which looks
    only at what follows. With `prompt_logprobs`, the echoed prompt is emitted token by token as its logprobs
    arrive (the first token has none)."""

    index: int
    stop: list[str]
    logprobs: int | None = None  # alternatives wanted per token; None: no logprobs
    echo: list[int] | None = None  # the prompt's ids, when it is echoed
    prompt_logprobs: bool = False
    min_tokens: int = 0
    text_offset: int = 0  # where the next decoded character begins
    emitted: int = 0  # characters of the choice's text sent so far (the echoed prompt included)
    completion_tokens: int = 0
    total_logprob: float = 0.0  # of the generated tokens: what best_of ranks candidates by
    finish_reason: str | None = None
    decoder: IncrementalDecoder = field(default_factory=IncrementalDecoder)
    echoed: int = 0  # prompt tokens emitted so far
    held_logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is held back

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.stop)

    @property
    def want_logprobs(self) -> bool:
        return self.logprobs is not None

    def opening(self) -> ChoiceDelta:
        """What the choice says before any event: the echoed prompt, unless it waits for its logprobs."""
        delta = ChoiceDelta(self.index)
        if self.echo is not None and not self.prompt_logprobs:
            self.echo_prompt(len(self.echo), delta)
        return delta

    def decode(self, token: int) -> tuple[str, int]:
        """(the text one more token completes, where the token's character begins)."""
        before = self.text_offset
        piece = self.decoder.push(token)
        self.text_offset += len(piece)
        if not piece or self.decoder.pending:  # it continues a character, or begins one after bad bytes
            return piece, before + (len(piece) if self.decoder.pending and piece else 0)
        return piece, self.text_offset - 1  # it ends a character: the last of the piece

    def emit(self, text: str, delta: ChoiceDelta) -> None:
        """Send text, and the logprobs of the tokens whose characters it completes."""
        delta.text += text
        self.emitted += len(text)
        while self.held_logprobs and self.held_logprobs[0].text_offset < self.emitted:
            delta.logprobs.append(self.held_logprobs.pop(0))

    def echo_prompt(
        self, end: int, delta: ChoiceDelta, start: int = 1, rows: Sequence[tuple[float, list]] = ()
    ) -> None:
        """Emit the prompt's tokens up to `end`; `rows` are the (logprob, top) of its tokens from `start` on."""
        assert self.echo is not None
        for position in range(self.echoed, end):
            piece, offset = self.decode(self.echo[position])
            if position == len(self.echo) - 1:
                tail = self.decoder.flush()  # the prompt ends here, a complete character or not
                self.text_offset += len(tail)
                piece += tail
            if self.prompt_logprobs:
                logprob, top = rows[position - start] if position >= start and rows else (None, [])
                delta.logprobs.append(TokenLogprob(self.echo[position], logprob, top, offset))
            delta.text += piece
            self.emitted += len(piece)
        self.echoed = max(self.echoed, end)

    def on_prompt_logprobs(self, event: PromptLogprobsEvent, delta: ChoiceDelta) -> None:
        if self.echo is None or not self.prompt_logprobs:
            return
        rows = list(zip(event.token_logprobs, event.top_logprobs, strict=True))
        self.echo_prompt(event.start + len(rows), delta, event.start, rows)

    def finish_echo(self, delta: ChoiceDelta) -> None:
        """The prompt's scores are over (its first token came, or it ended): whatever is left of it goes out."""
        if self.echo is not None and self.echoed < len(self.echo):
            self.echo_prompt(len(self.echo), delta)

    def on_token(self, event: TokenEvent, delta: ChoiceDelta) -> None:
        self.finish_echo(delta)
        self.completion_tokens += 1
        self.total_logprob += event.logprob
        piece, offset = self.decode(event.token)
        if self.want_logprobs:
            self.held_logprobs.append(TokenLogprob(event.token, event.logprob, event.top_logprobs, offset))
        if self.completion_tokens <= self.min_tokens:
            text, stopped = piece, False
        else:
            text, stopped = self.matcher.push(piece)
        self.emit(text, delta)
        if stopped:
            self.held_logprobs.clear()  # the stop sequence's own tokens
            self.finish_reason = delta.finish_reason = "stop"

    def on_finish(self, delta: ChoiceDelta, reason: str = "length") -> None:
        """The engine ended the sequence: at max_tokens or the context limit ("length"), or where its grammar
        ends ("stop"). Release what was held back."""
        self.finish_echo(delta)
        tail = self.decoder.flush()
        self.text_offset += len(tail)
        text, stopped = (tail, False) if self.completion_tokens <= self.min_tokens else self.matcher.push(tail)
        if not stopped:
            text += self.matcher.flush()
        self.emit(text, delta)
        if stopped:
            self.held_logprobs.clear()
        delta.logprobs += self.held_logprobs  # a token whose bytes ended as nothing at all
        self.held_logprobs.clear()
        self.finish_reason = delta.finish_reason = "stop" if stopped or reason == "stop" else "length"


class GenerationFailed(Exception):
    """A sequence failed in the engine: its logits were not finite, the server is going away, or (client_error)
    the request's own constraint failed."""

    def __init__(self, message: str, client_error: bool = False) -> None:
        super().__init__(message)
        self.client_error = client_error


async def merge_choice_events(
    requests: list[EngineRequest], choices: list[ChoiceText], idle_seconds: float
) -> AsyncIterator[list[ChoiceDelta] | None]:
    """Merge the events of every choice into lists of deltas; None after about `idle_seconds` without events.

    The first list holds each choice's opening (an echoed prompt), when there is one. A choice that meets a
    stop sequence is cancelled in the engine at once. The engine requests are cancelled when the iteration ends
    for any reason (client gone, error), so their slots are freed.
    """
    openings = [delta for delta in (choice.opening() for choice in choices) if delta.changed]
    if openings:
        yield openings
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
                choice = by_index[index]
                apply_event(choice, event, deltas.setdefault(index, ChoiceDelta(index)))
                if choice.finish_reason is not None:
                    open_choices.discard(index)
                    requests_by_index[index].reached_stop_sequence()
            yield [deltas[index] for index in sorted(deltas)]
    finally:
        heartbeat.cancel()
        for request in requests:
            request.cancel()


def apply_event(choice: ChoiceText, event: TokenEvent | PromptLogprobsEvent | FinishEvent, delta: ChoiceDelta) -> None:
    if isinstance(event, TokenEvent):
        choice.on_token(event, delta)
    elif isinstance(event, PromptLogprobsEvent):
        choice.on_prompt_logprobs(event, delta)
    elif event.reason == "error":
        raise GenerationFailed(event.message or "generation failed", event.client_error)
    else:
        choice.on_finish(delta, event.reason)


IDLE = object()  # put on a request's event queue at every beat, so a stream waiting for tokens can ping


async def beat(events: asyncio.Queue, seconds: float) -> None:
    """One timer per stream (not one per token): wake the stream's reader every `seconds` it has nothing to
    read (a reader that is not reading does not need more wake-ups queued)."""
    while True:
        await asyncio.sleep(seconds)
        if events.empty():
            events.put_nowait(IDLE)
