"""The engine in process: continuous batching, chunked prefill beside running streams, slot reuse."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model.sampling import SamplingParams
from server.engine import Engine, EngineOverloaded, EngineRequest, FinishEvent, TokenEvent
from server.metrics import Metrics
from tests.generation import tokens_alone
from tests.server.conftest import make_checkpoint
from weights.io import load_checkpoint

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    folder = make_checkpoint(tmp_path_factory.mktemp("engine") / "ckpt", use_abs_pos_emb=False, max_seq_len=1)
    return load_checkpoint(folder)[0]


def run_engine(model, coroutine_factory, **options) -> object:
    engine = Engine(model, metrics=Metrics(), **{"max_batch_size": 4, "max_queue": 8, **options})
    engine.start()
    try:
        return asyncio.run(coroutine_factory(engine))
    finally:
        engine.shutdown()
        engine.join()


def alone(model, prompt: list[int], tokens: int) -> list[int]:
    return tokens_alone(model, prompt, GREEDY, tokens)


async def until(condition, timeout: float = 60) -> None:
    """Wait for the engine's observable state; the timeout only guards against a hang."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def collect(events: asyncio.Queue, count: int) -> dict[int, list]:
    """Every event of `count` requests sharing one queue, in arrival order, by tag."""
    seen: dict[int, list] = {}
    finished = 0
    while finished < count:
        tag, event = await events.get()
        seen.setdefault(tag, []).append(event)
        finished += isinstance(event, FinishEvent)
    return seen


def test_requests_batched_together_give_their_text_alone(model) -> None:
    prompts = [list(f"prompt {i} ".encode()) * (i + 1) for i in range(6)]  # more requests than slots

    async def scenario(engine: Engine) -> dict[int, list]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        engine.submit([EngineRequest(p, GREEDY, 20 + i, loop, events, tag=i) for i, p in enumerate(prompts)])
        return await collect(events, len(prompts))

    seen = run_engine(model, scenario)
    for tag, prompt in enumerate(prompts):
        tokens = [event.token for event in seen[tag] if isinstance(event, TokenEvent)]
        assert tokens == alone(model, prompt, 20 + tag)
        assert seen[tag][-1] == FinishEvent("length")


def test_a_long_prompt_is_read_a_chunk_per_step_beside_a_running_stream(model) -> None:
    long_prompt = list(torch.randint(0, 256, (40 * 8,), generator=torch.Generator().manual_seed(0)).tolist())

    async def scenario(engine: Engine) -> list:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        engine.submit([EngineRequest(list(b"running"), GREEDY, 200, loop, events, tag=0)])
        while (await events.get())[0] != 0:
            pass
        engine.submit([EngineRequest(long_prompt, GREEDY, 5, loop, events, tag=1)])
        order = []
        while True:
            tag, event = await events.get()
            order.append(tag)
            if tag == 1 and isinstance(event, TokenEvent):
                return order

    order = run_engine(model, scenario, prefill_chunk=8, read_whole_prompt=True)  # all 40 chunks, not the last 3
    assert order.count(0) >= 39  # the 40-chunk prompt took 40 steps, and the stream got a token in each


def test_queue_limit_and_cancelled_waiting_request(model) -> None:
    async def scenario(engine: Engine) -> tuple[float, bool]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        running = EngineRequest(list(b"a"), GREEDY, 10_000, loop, events, tag=0)
        waiting = EngineRequest(list(b"b"), GREEDY, 10, loop, events, tag=1)
        engine.submit([running, waiting])
        with pytest.raises(EngineOverloaded):
            engine.submit([EngineRequest(list(b"c"), GREEDY, 10, loop, events, tag=2)])
        waiting.cancel()
        await events.get()
        running.cancel()
        await until(lambda: not engine.busy)
        started = engine.metrics.registry.get_sample_value("windowlm_queue_time_seconds_count", {"model": "default"})
        return started, engine.busy

    started, busy = run_engine(model, scenario, max_batch_size=1, max_queue=1)
    assert started == 1  # the cancelled waiting request never took a slot
    assert not busy


def test_a_batched_step_that_fails_once_is_run_again_exactly(model) -> None:
    """The step raises at its very end (the output head): the slot-by-slot retry must find every position
    where it was, so each request's text is still its text alone."""
    prompts = [list(f"row {i} ".encode()) for i in range(3)]

    async def scenario(engine: Engine) -> dict[int, list]:
        layers = engine.runner.decoder.layers
        project = layers.logits
        failures = []

        def fail_once_when_batched(hidden: torch.Tensor) -> torch.Tensor:
            if hidden.shape[0] > 1 and not failures:
                failures.append(hidden.shape[0])
                raise RuntimeError("the output head failed")
            return project(hidden)

        layers.logits = fail_once_when_batched
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        engine.submit([EngineRequest(p, GREEDY, 12, loop, events, tag=i) for i, p in enumerate(prompts)])
        seen = await collect(events, len(prompts))
        assert failures, "no batched step failed: the test did not test anything"
        return seen

    seen = run_engine(model, scenario)
    for tag, prompt in enumerate(prompts):
        assert [e.token for e in seen[tag] if isinstance(e, TokenEvent)] == alone(model, prompt, 12)
        assert seen[tag][-1] == FinishEvent("length")


def test_a_request_whose_reader_falls_behind_pauses_then_stalls(model) -> None:
    async def scenario(engine: Engine) -> tuple[int, int, FinishEvent]:
        events: asyncio.Queue = asyncio.Queue()
        request = EngineRequest(list(b"slow reader"), GREEDY, 10_000, asyncio.get_running_loop(), events)
        engine.submit([request])
        await until(lambda: request.paused_since is not None)  # the engine waits for its reader
        paused_at = events.qsize()  # nothing was marked delivered: the engine stopped at the buffer
        request.mark_delivered(paused_at)  # the reader catches up: generation goes on
        while events.qsize() < paused_at + 2:
            await asyncio.sleep(0.01)
        while True:  # now it never reads again: ended after the stall timeout
            _, event = await events.get()
            if isinstance(event, FinishEvent):
                return paused_at, request.generated, event

    paused_at, generated, finish = run_engine(model, scenario, stream_buffer=4, stall_timeout=1.0)
    assert paused_at == 4
    assert generated == 8
    assert finish.reason == "error" and "read nothing" in finish.message


def test_a_waiting_request_whose_connection_closed_is_never_started(model) -> None:
    """The client's close sits unread in its socket (the event loop has not noticed it): the engine asks the
    connection at admission and drops the request instead of starting it."""

    async def scenario(engine: Engine) -> tuple[list, float]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        gone = EngineRequest(list(b"gone"), GREEDY, 5, loop, events, tag=0, peer_closed=lambda: True)
        here = EngineRequest(list(b"here"), GREEDY, 5, loop, events, tag=1, peer_closed=lambda: False)
        engine.submit([gone, here])
        seen = await collect(events, 1)
        return seen, engine.metrics.registry.get_sample_value("windowlm_queue_time_seconds_count", {"model": "default"})

    seen, started = run_engine(model, scenario, max_batch_size=1)
    assert list(seen) == [1] and started == 1
    assert seen[1][-1] == FinishEvent("length")


def test_generation_ends_exactly_at_the_context_limit(tmp_path) -> None:
    """A model of 24 absolute positions: a prompt of 20 gets 5 tokens (fed at 20..23, the fifth never fed),
    then "length", however many were asked for; a prompt that fills the context still gets one."""
    folder = make_checkpoint(tmp_path / "ckpt", use_abs_pos_emb=True, max_seq_len=24)
    bounded = load_checkpoint(folder)[0]
    prompts = [list(b"twenty bytes of text"), list(b"exactly twenty-four byte")]

    async def scenario(engine: Engine) -> dict[int, list]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        engine.submit([EngineRequest(p, GREEDY, 1000, loop, events, tag=i) for i, p in enumerate(prompts)])
        return await collect(events, len(prompts))

    seen = run_engine(bounded, scenario)
    for tag, (prompt, expected) in enumerate(zip(prompts, (5, 1), strict=True)):
        tokens = [event.token for event in seen[tag] if isinstance(event, TokenEvent)]
        assert len(tokens) == expected and tokens == tokens_alone(bounded, prompt, GREEDY, 1000)
        assert seen[tag][-1] == FinishEvent("length")
