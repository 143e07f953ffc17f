"""The scheduler: which requests hold the slots, and what each step does with them. Plain Python, no tensors.

The engine asks it, once per step, for a `StepPlan` (which slots read how many prompt tokens, which decode
which token), has the runner carry the plan out, and reports back: the chunks read, the tokens sampled, the
rows that failed. Every decision about a request's life is taken here: admission in arrival order, the queue
limit, prompt progress one chunk at a time, pausing a slot whose reader falls behind, and each finish with
its reason. What it decides is collected in a `StepStats` record for the metrics.

Not thread-safe: the engine thread calls every method, except `add` and `take_waiting`, which touch the
waiting queue and are called under the engine's lock (the event loop submits through it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from server.engine_request import EngineRequest, PromptLogprobsEvent

FinishReason = Literal["stop", "length", "cancelled", "error", "refused", "stalled"]  # refused: the request's fault
FAILURE_REASONS = ("cancelled", "error", "stalled")


class EngineOverloaded(Exception):
    """The slots and the waiting queue are full."""


def tokens_that_fit(prompt_tokens: int, context_limit: int | None) -> int | None:
    """How many tokens can follow a prompt of `prompt_tokens` in a model of `context_limit` positions (None:
    no limit). The last generated token is never fed back, so a prompt that fills the context still gets one:
    with a limit of 8, a prompt of 6 tokens takes positions 0..5, tokens 1 and 2 are fed at 6 and 7, and
    token 3 ends the sequence. Zero or less: the prompt itself does not fit. (A request of max_tokens 0 reads
    its prompt and samples nothing: it fits wherever its prompt does.)"""
    return None if context_limit is None else context_limit - prompt_tokens + 1


@dataclass
class Slot:
    request: EngineRequest
    max_tokens: int  # the request's max_tokens, or fewer where the context ends first; 0: only read the prompt
    prefilled: int = 0  # prompt tokens already in the cache, or skipped as outside the model's reach
    read_from: int = 0  # the first prompt token read (those before it cannot change what follows)
    next_token: int | None = None  # sampled, not yet fed to the model


@dataclass(frozen=True)
class PromptChunk:
    """Prompt tokens [start, end) of the request in `slot`, to read into its cache this step."""

    slot: int
    request: EngineRequest
    start: int
    end: int

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt[self.start : self.end]

    @property
    def completes_prompt(self) -> bool:
        return self.end == len(self.request.prompt)

    @property
    def samples(self) -> bool:
        """After this chunk the slot samples its first token (one of max_tokens 0 ends instead)."""
        return self.completes_prompt and self.request.max_tokens > 0


@dataclass(frozen=True)
class DecodeRow:
    """Feed `token` to `slot`, which then samples its next token."""

    slot: int
    request: EngineRequest
    token: int


@dataclass
class StepPlan:
    prompt_chunks: list[PromptChunk] = field(default_factory=list)
    decode_rows: list[DecodeRow] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prompt_chunks and not self.decode_rows


@dataclass(frozen=True)
class SampledToken:
    slot: int
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]]
    completes: bool = False  # the request's grammar allows nothing after this token: it ends with "stop"


@dataclass
class StepOutput:
    """What the runner made of a plan: the chunks it read, one token per slot it sampled, errors by slot."""

    read: list[PromptChunk] = field(default_factory=list)
    sampled: list[SampledToken] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)  # slots whose grammar ended their text instead of a token
    refused: dict[int, str] = field(default_factory=dict)  # slots the request itself failed (its constraint)
    errors: dict[int, str] = field(default_factory=dict)
    prompt_logprobs: dict[int, PromptLogprobsEvent] = field(default_factory=dict)  # by slot, of chunks read
    decode_seconds: float | None = None  # the batched decode step and its sampling, when there was one


@dataclass(frozen=True)
class Finish:
    request: EngineRequest
    reason: FinishReason
    message: str | None = None
    started: bool = True  # False: dropped from the queue before it held a slot


@dataclass
class StepStats:
    """What one step did, for the metrics (observed once per step, in one place)."""

    queue_seconds: list[float] = field(default_factory=list)  # of each request admitted
    prompt_tokens: int = 0  # taken in, with those skipped as beyond the model's reach (at a prompt's first chunk)
    prompt_tokens_read: int = 0  # read into the cache
    generated_tokens: int = 0
    first_token_seconds: list[float] = field(default_factory=list)  # arrival to first token
    inter_token_seconds: list[float] = field(default_factory=list)
    decode_seconds: float | None = None
    decode_batch: int = 0
    finishes: list[Finish] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    paused: int = 0  # slots waiting for their reader


class Scheduler:
    """Continuous batching over `num_slots` slots, with at most `max_queue` requests waiting."""

    def __init__(
        self,
        num_slots: int,
        max_queue: int,
        *,
        chunk_end: Callable[[int, int], int],
        reading_start: Callable[[EngineRequest], int] | None = None,
        context_limit: int | None = None,
        prompt_tokens_per_step: int | None = None,
        stream_buffer: int = 64,
        stall_timeout: float = 120.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.num_slots = num_slots
        self.max_queue = max_queue
        self.chunk_end = chunk_end  # (prompt position, prompt length) -> end of the chunk read from there
        self.reading_start = reading_start  # request -> its first prompt token to read (None: always 0)
        self.context_limit = context_limit
        self.prompt_tokens_per_step = prompt_tokens_per_step  # None: every prefilling slot reads a chunk
        self.stream_buffer = stream_buffer
        self.stall_timeout = stall_timeout
        self.clock = clock
        self.slots: list[Slot | None] = [None] * num_slots
        self.waiting: deque[EngineRequest] = deque()
        self.stats = StepStats()

    @property
    def running(self) -> int:
        return sum(slot is not None for slot in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def held_requests(self) -> list[EngineRequest]:
        """Every request waiting or in a slot."""
        return list(self.waiting) + [slot.request for slot in self.slots if slot is not None]

    # -- the waiting queue (under the engine's lock) -----------------------------------------------------

    def add(self, requests: list[EngineRequest]) -> None:
        """Queue requests, all or none: raises EngineOverloaded when they would not fit the free slots and
        the queue, ValueError for a prompt longer than the context or a negative max_tokens."""
        running, waiting = self.running, len(self.waiting)
        if waiting + len(requests) > self.num_slots - running + self.max_queue:
            raise EngineOverloaded(f"{running} of {self.num_slots} slots busy and {waiting} waiting")
        for request in requests:
            fit = tokens_that_fit(len(request.prompt), self.context_limit)
            if not request.prompt or (fit is not None and fit < 1):
                raise ValueError(f"a prompt of {len(request.prompt)} tokens does not fit the context")
            if request.max_tokens < 0:
                raise ValueError(f"max_tokens must be at least 0, got {request.max_tokens}")
            if request.prompt_logprobs is not None and request.prompt_logprobs < 0:
                raise ValueError(f"prompt_logprobs must be None or at least 0, got {request.prompt_logprobs}")
        self.waiting.extend(requests)

    def take_waiting(self) -> list[EngineRequest]:
        """Take as many waiting requests as there are free slots, in arrival order, for `admit`. Requests whose
        client left while they waited leave the queue here, never started."""
        if any(request.cancelled or request.stop_sequence_reached for request in self.waiting):
            for request in self.waiting:  # their queue places are free at once, not when a slot frees
                if request.cancelled or request.stop_sequence_reached:
                    self.drop_unstarted(request)
            self.waiting = deque(request for request in self.waiting if not request.finished)
        free = self.num_slots - self.running
        return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]

    # -- each step (the engine thread) ---------------------------------------------------------------------

    def admit(self, request: EngineRequest) -> int:
        """Give a taken request the lowest free slot -> its index, for the runner to start it there (reading its
        prompt from the slot's `read_from`)."""
        index = self.slots.index(None)
        fit = tokens_that_fit(len(request.prompt), self.context_limit)
        start = 0 if self.reading_start is None else self.reading_start(request)
        max_tokens = request.max_tokens if fit is None else min(request.max_tokens, fit)
        self.slots[index] = Slot(request, max_tokens, prefilled=start, read_from=start)
        request.started_at = self.clock()
        self.stats.queue_seconds.append(request.started_at - request.arrived_at)
        return index

    def drop_unstarted(self, request: EngineRequest) -> None:
        request.finished = True
        self.stats.finishes.append(Finish(request, "cancelled", started=False))

    def release(self) -> None:
        """Free the slots of requests their client ended: at a stop sequence, or by leaving."""
        for index, slot in enumerate(self.slots):
            if slot is not None and not slot.request.finished:
                if slot.request.stop_sequence_reached:
                    self.finish(index, "stop")
                elif slot.request.cancelled:
                    self.finish(index, "cancelled")

    def plan(self) -> StepPlan:
        """The prompt chunks of this step (see prompt_chunks), and a decode row for every generating slot whose
        reader keeps up (a slot whose reader has not read for `stall_timeout` seconds is ended here)."""
        plan = StepPlan(prompt_chunks=self.prompt_chunks())
        for index, slot in enumerate(self.slots):
            generating = slot is not None and slot.prefilled == len(slot.request.prompt) and slot.next_token is not None
            if generating and not self.waits_for_reader(index, slot):
                plan.decode_rows.append(DecodeRow(index, slot.request, slot.next_token))
        return plan

    def prompt_chunks(self) -> list[PromptChunk]:
        """The next chunk of each prompt still being read, earliest admitted first, while they fit
        `prompt_tokens_per_step` (the first always does: every step reads some prompt while one waits). The
        budget bounds how long a step, and so each running stream's next token, waits on prompts."""
        reading = [index for index, slot in enumerate(self.slots) if slot and slot.prefilled < len(slot.request.prompt)]
        reading.sort(key=lambda index: self.slots[index].request.started_at)
        chunks, tokens = [], 0
        for index in reading:
            slot = self.slots[index]
            end = self.chunk_end(slot.prefilled, len(slot.request.prompt))
            tokens += end - slot.prefilled
            if chunks and self.prompt_tokens_per_step is not None and tokens > self.prompt_tokens_per_step:
                break
            chunks.append(PromptChunk(index, slot.request, slot.prefilled, end))
        return chunks

    def waits_for_reader(self, index: int, slot: Slot) -> bool:
        """Whether the slot's reader is `stream_buffer` events behind; past `stall_timeout` it is ended."""
        request = slot.request
        if request.undelivered < self.stream_buffer:
            request.paused_since = None
            return False
        now = self.clock()
        if request.paused_since is None:
            request.paused_since = now
        elif now - request.paused_since > self.stall_timeout:
            self.finish(index, "stalled", f"the client read nothing for {self.stall_timeout:g} s")
        return True

    def record(self, plan: StepPlan, output: StepOutput) -> None:
        """Take in what the runner made of the plan: read chunks advance (a request of max_tokens 0 ends with its
        prompt), failed rows end, sampled tokens count (the engine has already handed each token to its request)."""
        for chunk in output.read:
            slot = self.slots[chunk.slot]
            skipped = slot.read_from if chunk.start == slot.read_from else 0  # counted with the first chunk
            slot.prefilled = chunk.end
            self.stats.prompt_tokens += skipped + chunk.end - chunk.start
            self.stats.prompt_tokens_read += chunk.end - chunk.start
            if chunk.completes_prompt and not chunk.samples:
                self.finish(chunk.slot, "length")
        for index, message in output.errors.items():
            self.finish(index, "error", message)
        for index, message in output.refused.items():
            self.finish(index, "refused", message)
        for sample in output.sampled:
            self.token_sampled(sample.slot, sample.token, sample.completes)
        for index in output.ended:
            self.finish(index, "stop")
        if output.decode_seconds is not None:
            self.stats.decode_seconds = output.decode_seconds
            self.stats.decode_batch = len(plan.decode_rows)

    def token_sampled(self, index: int, token: int, completes: bool = False) -> None:
        slot = self.slots[index]
        request = slot.request
        now = self.clock()
        if request.first_token_at is None:
            request.first_token_at = now
            self.stats.first_token_seconds.append(now - request.arrived_at)
        else:
            self.stats.inter_token_seconds.append(now - request.last_token_at)
        request.last_token_at = now
        request.generated += 1
        self.stats.generated_tokens += 1
        slot.next_token = token
        if completes:
            self.finish(index, "stop")
        elif request.generated >= slot.max_tokens:
            self.finish(index, "length")

    def finish(self, index: int, reason: FinishReason, message: str | None = None) -> None:
        """End the request in slot `index` and free the slot (before its client hears of it: the client may
        send its next request at once)."""
        slot = self.slots[index]
        if slot is None or slot.request.finished:
            return
        slot.request.finished = True
        self.slots[index] = None
        self.stats.finishes.append(Finish(slot.request, reason, message))

    def take_stats(self) -> StepStats:
        """The step's record, with the slot and queue counts as they are now; a fresh one begins."""
        stats, self.stats = self.stats, StepStats()
        stats.running, stats.waiting = self.running, len(self.waiting)
        stats.paused = sum(slot is not None and slot.request.paused_since is not None for slot in self.slots)
        return stats
