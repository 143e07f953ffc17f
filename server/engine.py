"""The engine: one thread owns the model, its KV cache slots and the waiting queue, and batches every running
request into one decode step.

It knows token ids only. Requests come in through `submit` (from the event loop), results go out as events on
each request's asyncio queue. One step of the loop:

    1. free the slots of finished or cancelled requests;
    2. admit waiting requests into free slots (a request whose client has gone never starts);
    3. advance every prompt still being read by at most one prefill chunk, so a long prompt never holds up the
       running streams for more than one chunk; a prompt that is done samples its first token;
    4. one batched decode step over every slot that is generating, one new token each.

A slot whose reader has fallen `stream_buffer` token events behind is paused: it keeps its place and its cache
but skips decode steps until its reader catches up, and is ended after `stall_timeout` seconds of waiting.
An exception inside a step fails only the requests it belongs to (a failed batched step is retried slot by
slot to find them); an exception anywhere else ends the loop, and `failure` says why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from model.sampling import SequenceSampler
from model.transformer import LocalTransformer
from server.engine_request import EngineRequest, FinishEvent, TokenEvent
from server.faults import FaultInjector
from server.metrics import Metrics
from server.runner import ModelRunner

logger = logging.getLogger("windowlm.engine")


class EngineOverloaded(Exception):
    """The slots and the waiting queue are full."""


class EngineStopped(Exception):
    """The engine is not running (draining, stopped or dead)."""


@dataclass
class Slot:
    request: EngineRequest
    sampler: SequenceSampler
    prefilled: int = 0  # prompt tokens already in the cache
    next_token: int | None = None  # sampled, not yet fed to the model


class Engine:
    """Continuous batching over `max_batch_size` slots, with at most `max_queue` requests waiting."""

    def __init__(
        self,
        model: LocalTransformer,
        *,
        max_batch_size: int,
        max_queue: int,
        metrics: Metrics,
        prefill_chunk: int | None = None,
        stream_buffer: int = 64,
        stall_timeout: float = 120.0,
        faults: FaultInjector | None = None,
    ) -> None:
        self.runner = ModelRunner(model, num_slots=max_batch_size, prefill_chunk=prefill_chunk, faults=faults)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.stream_buffer = stream_buffer
        self.stall_timeout = stall_timeout
        self.faults = faults
        self.slots: list[Slot | None] = [None] * max_batch_size
        self.waiting: deque[EngineRequest] = deque()
        self.wakeup = threading.Condition()
        self.accepting = True
        self.running = False
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="windowlm-engine", daemon=True)
        metrics.kv_slots_total.set(max_batch_size)

    @property
    def context_limit(self) -> int | None:
        return self.runner.context_limit

    @property
    def alive(self) -> bool:
        return self.running and self.failure is None and self.thread.is_alive()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(slot is not None for slot in self.slots)

    def start(self) -> None:
        """Run the loop on a thread of its own."""
        self.running = True
        self.thread.start()

    def run_forever(self) -> None:
        """Run the loop on the calling thread until `stop`. On CPU this is best done on the main thread:
        torch's OpenMP pool is fast there, while parallel regions started from another thread are slower."""
        self.running = True
        self.thread = threading.current_thread()
        self.run()

    def stop(self) -> None:
        """Ask the loop to end after the current step (from any thread); new requests are refused at once."""
        with self.wakeup:
            self.accepting = False
            self.running = False
            self.wakeup.notify()

    def join(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def submit(self, requests: list[EngineRequest]) -> None:
        """Queue requests, all or none; raises EngineOverloaded or EngineStopped at once."""
        with self.wakeup:
            if not self.accepting or not self.alive:
                raise EngineStopped("the server is shutting down" if not self.accepting else "the engine has stopped")
            in_use = sum(slot is not None for slot in self.slots)
            if len(self.waiting) + len(requests) > self.max_batch_size - in_use + self.max_queue:
                raise EngineOverloaded(f"{in_use} of {self.max_batch_size} slots busy and {len(self.waiting)} waiting")
            for request in requests:
                request.wake_engine = self.wake
            self.waiting.extend(requests)
            self.metrics.requests_waiting.set(len(self.waiting))
            self.wakeup.notify()

    def held_requests(self) -> list[EngineRequest]:
        """Every request waiting or in a slot."""
        return list(self.waiting) + [slot.request for slot in self.slots if slot is not None]

    def wake(self) -> None:
        with self.wakeup:
            self.wakeup.notify()

    def abort_all(self, message: str) -> None:
        """Fail every waiting and running request (used when a drain runs out of time)."""
        with self.wakeup:
            for request in self.held_requests():
                request.cancelled = True
                request.emit(FinishEvent("error", message))
                request.finished = True
            self.wakeup.notify()

    # -- the engine thread --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                with self.wakeup:
                    while self.running and not self.busy:
                        self.wakeup.wait()
                    if not self.running:
                        break
                if not self.step():  # every slot waits for its reader: sleep until one reads (or a moment)
                    with self.wakeup:
                        self.wakeup.wait(0.05)
        except BaseException as error:  # the loop is dead: say so to /health and to every request
            logger.exception("engine loop failed")
            self.failure = error
        finally:
            with self.wakeup:  # under the lock: a submit either sees the engine stopped or is told here
                self.running = False
                held = self.held_requests()
            message = "the engine stopped" if self.failure is None else f"engine failure: {self.failure}"
            for request in held:
                if not request.finished:
                    request.emit(FinishEvent("error", message))

    def step(self) -> bool:
        """One round of the loop; False when it had nothing to do but wait for readers."""
        self.release_finished()
        self.admit()
        read = self.prefill()
        decoded = self.decode()
        self.update_gauges()
        return read or decoded

    def release_finished(self) -> None:
        for index, slot in enumerate(self.slots):
            if slot is None:
                continue
            request = slot.request
            if request.stop_requested and not request.finished:
                self.finish(index, "stop")
            elif request.cancelled and not request.finished:
                self.finish(index, "cancelled")
            self.slots[index] = None if request.finished else slot

    def admit(self) -> None:
        free = [index for index, slot in enumerate(self.slots) if slot is None]
        with self.wakeup:  # only the queue under the lock: the event loop's submit waits for it
            admitted = [(index, request) for index in free if (request := self.next_waiting()) is not None]
        for index, request in admitted:
            if request.client_gone():  # its client left, and the event loop has not noticed yet
                self.drop_unstarted(request)
                continue
            try:
                self.slots[index] = self.start_request(index, request)
            except Exception as error:  # e.g. parameters the sampler refuses: this request fails alone
                logger.exception("starting request %d failed", request.id)
                request.finished = True
                request.emit(FinishEvent("error", f"the request could not start: {error}"))
                self.metrics.request_failures.labels(reason="error").inc()
                continue
            if self.faults is not None:
                self.faults.check_admission(request)

    def next_waiting(self) -> EngineRequest | None:
        while self.waiting:
            request = self.waiting.popleft()
            if request.cancelled or request.stop_requested:  # its client left while it waited: never started
                self.drop_unstarted(request)
                continue
            return request
        return None

    def drop_unstarted(self, request: EngineRequest) -> None:
        request.finished = True
        self.metrics.request_failures.labels(reason="cancelled").inc()

    def start_request(self, index: int, request: EngineRequest) -> Slot:
        request.started_at = time.perf_counter()
        self.metrics.queue_time.observe(request.started_at - request.arrived_at)
        return Slot(request=request, sampler=self.runner.start(index, request.params, request.prompt))

    def prefill(self) -> bool:
        """Read one chunk of every prompt still being read; a prompt that fails to read fails alone."""
        read = False
        for index, slot in enumerate(self.slots):
            if slot is None or slot.prefilled == len(slot.request.prompt):
                continue
            prompt = slot.request.prompt
            end = self.runner.chunk_end(slot.prefilled, len(prompt))
            chunk = prompt[slot.prefilled : end]
            try:
                logits = self.runner.read_chunk(index, chunk)  # (1, V)
            except Exception as error:  # this prompt cannot be read: fail it alone
                logger.exception("reading the prompt of request %d failed", slot.request.id)
                self.finish(index, "error", f"reading the prompt failed: {error}")
                continue
            read = True
            slot.prefilled = end
            self.metrics.prompt_tokens_total.inc(len(chunk))
            if slot.prefilled == len(prompt):
                self.sample([index], logits)
        return read

    def decode(self) -> bool:
        """One token for every generating slot whose reader keeps up; False when no slot could go on."""
        generating = [
            i
            for i, slot in enumerate(self.slots)
            if slot is not None and slot.next_token is not None and not self.waits_for_reader(i, slot)
        ]
        if not generating:
            return False
        started = time.perf_counter()
        slots = [self.slots[i] for i in generating]
        requests = [slot.request for slot in slots]
        ran, logits, errors = self.runner.decode(generating, [slot.next_token for slot in slots], requests)
        for index, message in errors.items():
            self.finish(index, "error", message)
        if ran:
            self.sample(ran, logits)
        self.metrics.decode_step_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(generating))
        return True

    def waits_for_reader(self, index: int, slot: Slot) -> bool:
        """Whether the slot's reader is `stream_buffer` events behind; past `stall_timeout` it is ended."""
        request = slot.request
        if request.undelivered < self.stream_buffer:
            request.paused_since = None
            return False
        now = time.monotonic()
        if request.paused_since is None:
            request.paused_since = now
        elif now - request.paused_since > self.stall_timeout:
            self.finish(index, "stalled", f"the client read nothing for {self.stall_timeout:g} s")
        return True

    def sample(self, indices: list[int], logits: torch.Tensor) -> None:
        """Sample one token for each of the slots `indices` from logits (B, V) and hand it over."""
        slots = [self.slots[i] for i in indices]
        result = self.runner.sample([slot.sampler for slot in slots], logits)
        tokens, logprobs = result.tokens.tolist(), result.logprobs.tolist()  # one device sync for the batch
        now = time.perf_counter()
        limit = self.context_limit
        for row, (index, slot) in enumerate(zip(indices, slots, strict=True)):
            request = slot.request
            if result.errors[row] is not None:
                self.finish(index, "error", f"sampling failed: {result.errors[row]}")
                continue
            token = tokens[row]
            request.emit(TokenEvent(token, logprobs[row], result.top_logprobs[row]))
            if request.first_token_at is None:
                request.first_token_at = now
                self.metrics.time_to_first_token.observe(now - request.arrived_at)
            else:
                self.metrics.inter_token_latency.observe(now - request.last_token_at)
            request.last_token_at = now
            request.generated += 1
            self.metrics.generation_tokens_total.inc()
            slot.next_token = token
            position = len(request.prompt) + request.generated - 1  # where the new token would be fed
            if request.generated >= request.max_tokens or (limit is not None and position >= limit):
                self.finish(index, "length")

    def finish(self, index: int, reason: str, message: str | None = None) -> None:
        slot = self.slots[index]
        request = slot.request
        if request.finished:
            return
        request.finished = True
        slot.next_token = None
        self.slots[index] = None  # free before telling the client, who may send its next request at once
        if reason != "cancelled":  # a stalled request ends with an error its reader may still see
            request.emit(FinishEvent("error" if reason == "stalled" else reason, message))
        if reason in ("cancelled", "error", "stalled"):
            self.metrics.request_failures.labels(reason=reason).inc()
        now = time.perf_counter()
        self.metrics.e2e_latency.observe(now - request.arrived_at)
        self.metrics.request_prompt_tokens.observe(len(request.prompt))
        self.metrics.request_generation_tokens.observe(request.generated)

    def update_gauges(self) -> None:
        in_use = sum(slot is not None for slot in self.slots)
        self.metrics.kv_slots_used.set(in_use)
        self.metrics.requests_running.set(in_use)
        self.metrics.requests_waiting.set(len(self.waiting))
