"""The engine: one thread that owns the model, asks the scheduler for each step's plan, has the runner carry
it out, and hands the results on — token and finish events to each request's event loop, one stats record
per step to the metrics.

It knows token ids only. Requests come in through `submit` (from the event loop); each step:

    1. free the slots of requests their client ended (a stop sequence reached, or the client gone);
    2. admit waiting requests into free slots (a request whose client has gone never starts);
    3. plan: the next chunk of every prompt still being read (so a long prompt holds the running streams up
       for one chunk at most; a prompt is read from where it can still matter, see ModelRunner.reading_start),
       and one decode row for every generating slot whose reader keeps up;
    4. run the plan; every slot that finished its prompt or decoded samples one token (a request of max_tokens
       0 ends with its prompt instead). A request that asked for prompt logprobs gets those of each chunk
       read, before any token of its own.

An exception inside a step fails only the requests it belongs to (the runner's business); an exception
anywhere else ends the loop, `failure` says why, and every request held is told.
"""

from __future__ import annotations

import logging
import threading

from model.transformer import LocalTransformer
from server.engine_request import EngineRequest, FinishEvent, PromptLogprobsEvent, TokenEvent
from server.faults import FaultInjector
from server.metrics import Metrics
from server.runner import ModelRunner
from server.scheduler import EngineOverloaded, Scheduler
from server.thread_tuner import ThreadTuner

__all__ = [
    "Engine",
    "EngineOverloaded",
    "EngineRequest",
    "EngineStopped",
    "FinishEvent",
    "PromptLogprobsEvent",
    "TokenEvent",
]

logger = logging.getLogger("windowlm.engine")


class EngineStopped(Exception):
    """The engine is not running (draining, stopped or dead)."""


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
        prompt_tokens_per_step: int | None = None,
        stream_buffer: int = 64,
        stall_timeout: float = 120.0,
        faults: FaultInjector | None = None,
        read_whole_prompt: bool = False,
        thread_tuner: ThreadTuner | None = None,
    ) -> None:
        self.runner = ModelRunner(
            model,
            num_slots=max_batch_size,
            prefill_chunk=prefill_chunk,
            faults=faults,
            read_whole_prompt=read_whole_prompt,
        )
        self.scheduler = Scheduler(
            max_batch_size,
            max_queue,
            chunk_end=self.runner.chunk_end,
            reading_start=self.runner.reading_start,
            context_limit=self.runner.decoder.context_limit,
            prompt_tokens_per_step=prompt_tokens_per_step,
            stream_buffer=stream_buffer,
            stall_timeout=stall_timeout,
        )
        self.metrics = metrics
        self.faults = faults
        self.thread_tuner = thread_tuner  # None: the threads stay as they are
        self.wakeup = threading.Condition()
        self.accepting = True
        self.running = False
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="windowlm-engine", daemon=True)
        metrics.kv_slots_capacity.set(max_batch_size)

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.num_slots

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def context_limit(self) -> int | None:
        return self.scheduler.context_limit

    @property
    def alive(self) -> bool:
        return self.running and self.failure is None and self.thread.is_alive()

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    def start(self) -> None:
        """Run the loop on a thread of its own."""
        self.running = True
        self.thread.start()

    def run_forever(self) -> None:
        """Run the loop on the calling thread until `shutdown`. On CPU this is best done on the main thread:
        torch's OpenMP pool is fast there, while parallel regions started from another thread are slower."""
        self.running = True
        self.thread = threading.current_thread()
        self.run()

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; those held go on (a drain)."""
        with self.wakeup:
            self.accepting = False

    def shutdown(self) -> None:
        """Refuse new requests and end the loop after the current step (from any thread)."""
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
            self.scheduler.add(requests)
            for request in requests:
                request.wake_engine = self.wake
            self.metrics.requests_waiting.set(len(self.scheduler.waiting))
            self.wakeup.notify()

    def wake(self) -> None:
        with self.wakeup:
            self.wakeup.notify()

    def abort_all(self, message: str) -> None:
        """Fail every waiting and running request (used when a drain runs out of time)."""
        with self.wakeup:
            for request in self.scheduler.held_requests():
                request.cancelled = True
                request.emit(FinishEvent("error", message))
                request.finished = True
            self.wakeup.notify()

    # -- the engine thread --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                with self.wakeup:
                    while self.running and not self.scheduler.busy:
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
                held = self.scheduler.held_requests()
            message = "the engine stopped" if self.failure is None else f"engine failure: {self.failure}"
            for request in held:
                if not request.finished:
                    request.emit(FinishEvent("error", message))

    def step(self) -> bool:
        """One round of the loop; False when it had nothing to do but wait for readers."""
        if self.thread_tuner is not None:
            self.thread_tuner.update()
        scheduler = self.scheduler
        scheduler.release()
        with self.wakeup:  # only the queue under the lock: the event loop's submit waits for it
            taken = scheduler.take_waiting()
        for request in taken:
            if request.client_gone():  # its client left, and the event loop has not noticed yet
                scheduler.drop_unstarted(request)
            else:
                self.start_request(scheduler.admit(request), request)
        plan = scheduler.plan()
        if not plan.empty:
            output = self.runner.run(plan)
            for index, event in output.prompt_logprobs.items():  # before the first token, in prompt order
                scheduler.slots[index].request.emit(event)
            for sample in output.sampled:  # before the scheduler's record, which may end the request
                request = scheduler.slots[sample.slot].request
                request.emit(TokenEvent(sample.token, sample.logprob, sample.top_logprobs))
            scheduler.record(plan, output)
        stats = scheduler.take_stats()
        for finish in stats.finishes:
            if finish.reason in ("stop", "length"):
                finish.request.emit(FinishEvent(finish.reason))
            elif finish.reason in ("error", "stalled"):  # a stalled request's reader may still see why
                finish.request.emit(FinishEvent("error", finish.message))
            elif finish.reason == "refused":
                finish.request.emit(FinishEvent("error", finish.message, client_error=True))
        self.metrics.observe_step(stats)
        return not plan.empty

    def start_request(self, slot: int, request: EngineRequest) -> None:
        """Start an admitted request on the model; one that cannot start fails alone."""
        try:
            self.runner.start(slot, request, self.scheduler.slots[slot].read_from)
        except Exception as error:  # e.g. parameters the sampler refuses: this request fails alone
            logger.exception("starting request %d failed", request.id)
            self.scheduler.finish(slot, "error", f"the request could not start: {error}")
            return
        if self.faults is not None:
            self.faults.check_admission(request)
