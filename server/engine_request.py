"""One sequence the engine generates, and the events it sends back to the event loop that asked for it.

The engine thread writes a request's `generated` count and the event loop its `delivered` count, each side one
counter of its own, so no lock is needed: their difference is how many token events wait for a reader.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler, which holds requests, imports no torch
    from model.grammar import Grammar
    from model.sampling import SamplingParams


@dataclass
class TokenEvent:
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


@dataclass
class PromptLogprobsEvent:
    """Logprobs of prompt tokens [start, start + len(token_logprobs)) under the raw float32 logits of the
    tokens before each; a request that asked for them gets these events, in prompt order, covering positions
    1..len(prompt) - 1 once (none for a one-token prompt), all before its first TokenEvent or its FinishEvent."""

    start: int  # index in the prompt of the first token these logprobs are for (>= 1)
    token_logprobs: list[float]  # logprob of prompt[start + i] given prompt[: start + i]; may be -inf
    top_logprobs: list[list[tuple[int, float]]]  # the k best (token id, logprob) at each position, best first


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "error" (a cancelled request gets no event: nobody reads it)
    message: str | None = None
    client_error: bool = False  # an error the request caused (its constraint failed): a 400, not a 500


_request_ids = itertools.count()


@dataclass(eq=False)
class EngineRequest:
    """One sequence to generate; its events arrive on `events` in the event loop that created it."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int  # 0: read the prompt (for its logprobs), sample nothing, finish with "length"
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # receives (tag, event) pairs; several requests may share one queue
    tag: int = 0
    prompt_logprobs: int | None = None  # None: not wanted; k >= 0: PromptLogprobsEvents with k alternatives
    grammar: Grammar | None = None  # a constraint on the generated text; its end finishes the request ("stop")
    id: int = field(default_factory=lambda: next(_request_ids))
    cancelled: bool = False
    stop_sequence_reached: bool = False  # its text reached a stop sequence: a normal end, not a failure
    finished: bool = False
    arrived_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    generated: int = 0  # token events sent (engine thread)
    delivered: int = 0  # token events taken by the reader (event loop)
    paused_since: float | None = None  # when the engine began to wait for the reader (engine thread)
    wake_engine: Callable[[], None] | None = None  # set by the engine that holds the request
    peer_closed: Callable[[], bool] | None = None  # the HTTP connection's probe, to call on the event loop

    def client_gone(self, timeout: float = 1.0) -> bool:
        """Whether the client has left, asked of its connection on the event loop (from the engine thread, at
        admission: exact, where waiting for the disconnect to be noticed is not). False when it cannot tell."""
        if self.peer_closed is None:
            return False
        answer: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def probe() -> None:
            try:
                answer.set_result(self.peer_closed())
            except Exception as error:
                answer.set_exception(error)

        try:
            self.loop.call_soon_threadsafe(probe)
            return answer.result(timeout)
        except RuntimeError:  # the event loop has closed: nobody listens
            return True
        except Exception:
            return False

    @property
    def undelivered(self) -> int:
        return self.generated - self.delivered

    def cancel(self) -> None:
        """Ask the engine to drop this request; it frees its slot at the next step."""
        self.cancelled = True
        self.wake()

    def reached_stop_sequence(self) -> None:
        """End the request early because its text reached a stop sequence."""
        self.stop_sequence_reached = True
        self.wake()

    def mark_delivered(self, count: int) -> None:
        """The reader took `count` token events (event loop); a request paused for its reader may go on."""
        self.delivered += count
        if self.paused_since is not None:
            self.wake()

    def wake(self) -> None:
        if self.wake_engine is not None:
            self.wake_engine()

    def emit(self, event: TokenEvent | PromptLogprobsEvent | FinishEvent) -> None:
        """Hand an event to the request's event loop (called from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.tag, event))
        except RuntimeError:  # that event loop has closed: nobody listens any more, so stop generating
            self.cancelled = True
