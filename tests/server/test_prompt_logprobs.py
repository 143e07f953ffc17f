"""Prompt scoring in the engine: the logprob of every prompt token after the first (with its top alternatives),
as the model's own full forward gives it, and requests of max_tokens 0, which only read their prompt."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model.decoder import Decoder
from model.sampling import SamplingParams
from server.engine import Engine, EngineRequest, FinishEvent, PromptLogprobsEvent, TokenEvent
from server.metrics import Metrics
from tests.generation import tokens_alone
from tests.server.conftest import make_checkpoint
from weights.io import load_checkpoint

GREEDY = SamplingParams(temperature=0)
TOLERANCE = 1e-5  # absolute and relative: logprobs of this peaked model reach -100, where float32 steps by 8e-6


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=TOLERANCE)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    folder = make_checkpoint(tmp_path_factory.mktemp("scoring") / "ckpt", use_abs_pos_emb=False, max_seq_len=1)
    return load_checkpoint(folder)[0]


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory):
    """A model of 24 absolute positions."""
    folder = make_checkpoint(tmp_path_factory.mktemp("bounded") / "ckpt", use_abs_pos_emb=True, max_seq_len=24)
    return load_checkpoint(folder)[0]


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def full_forward_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of the model's own forward over the whole prompt: row i predicts prompt[i + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor(prompt)[None])[0].float(), dim=-1)  # (P, V)


def run(model, requests_of, prepare=None, **options) -> tuple[dict[int, list], Engine]:
    """Submit the requests `requests_of(loop, events)` to an engine (given to `prepare` before it starts)
    -> every event, by tag, and the engine."""
    engine = Engine(model, metrics=Metrics(), **{"max_batch_size": 8, "max_queue": 8, **options})
    if prepare is not None:
        prepare(engine)
    engine.start()

    async def scenario() -> dict[int, list]:
        events: asyncio.Queue = asyncio.Queue()
        requests = requests_of(asyncio.get_running_loop(), events)
        engine.submit(requests)
        seen: dict[int, list] = {}
        finished = 0
        while finished < len(requests):
            tag, event = await events.get()
            seen.setdefault(tag, []).append(event)
            finished += isinstance(event, FinishEvent)
        return seen

    try:
        return asyncio.run(scenario()), engine
    finally:
        engine.shutdown()
        engine.join()


def metric(engine: Engine, name: str) -> float:
    """A metric's value, summed over its labels."""
    families = engine.metrics.registry.collect()
    return sum(sample.value for family in families for sample in family.samples if sample.name == name)


def check_scored(model, prompt: list[int], events: list, k: int) -> None:
    """The request's prompt logprobs: positions 1..P-1 once, in order, before any other event, each value and
    its top k as the full forward gives them."""
    scored = [event for event in events if isinstance(event, PromptLogprobsEvent)]
    assert events[: len(scored)] == scored, "prompt logprobs come before the first token and the finish"
    positions = [event.start + i for event in scored for i in range(len(event.token_logprobs))]
    assert positions == list(range(1, len(prompt)))
    assert all(event.token_logprobs for event in scored)  # no empty event
    if len(prompt) == 1:
        return
    expected = full_forward_logprobs(model, prompt)[:-1]  # (P - 1, V): row i scores prompt[i + 1]
    got = torch.tensor([value for event in scored for value in event.token_logprobs])  # (P - 1,)
    want = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]  # (P - 1,)
    assert_close(got, want)
    tops = [top for event in scored for top in event.top_logprobs]
    assert all(len(top) == k for top in tops)
    if k:
        values, ids = expected.topk(k, dim=-1)  # (P - 1, k)
        assert [[token for token, _ in top] for top in tops] == ids.tolist()
        assert_close(torch.tensor([[value for _, value in top] for top in tops]), values)


@pytest.mark.parametrize("k", [0, 5])
def test_prompt_logprobs_are_those_of_the_full_forward(model, k: int) -> None:
    """Chunks of 16: prompts shorter than a chunk, exactly one, one more (a last chunk of one token, which
    predicts nothing in the prompt), and several; one token (no logprobs at all). They also generate, alone."""
    lengths = [1, 5, 16, 17, 50]
    prompts = [random_prompt(length, seed) for seed, length in enumerate(lengths)]

    def requests_of(loop, events) -> list[EngineRequest]:
        return [EngineRequest(p, GREEDY, 3, loop, events, tag=i, prompt_logprobs=k) for i, p in enumerate(prompts)]

    seen, _ = run(model, requests_of, prefill_chunk=16)
    for tag, prompt in enumerate(prompts):
        check_scored(model, prompt, seen[tag], k)
        tokens = [event.token for event in seen[tag] if isinstance(event, TokenEvent)]
        assert tokens == tokens_alone(model, prompt, GREEDY, 3)
        assert seen[tag][-1] == FinishEvent("length")
    starts = [event.start for event in seen[4] if isinstance(event, PromptLogprobsEvent)]
    assert starts == [1, 17, 33, 49]  # one event per chunk read: [0, 16) scores 1..16, and so on
    assert not any(isinstance(event, PromptLogprobsEvent) for event in seen[0])  # a one-token prompt: none


def test_max_tokens_zero_reads_the_prompt_and_generates_nothing(bounded) -> None:
    """Pure scoring, beside a request that generates: a prompt that fills the whole context (24 positions)
    with max_tokens 0 is accepted; both max_tokens 0 requests end with "length" and no token."""
    full, short, normal = random_prompt(24, 1), random_prompt(10, 2), random_prompt(12, 3)

    def requests_of(loop, events) -> list[EngineRequest]:
        return [
            EngineRequest(full, GREEDY, 0, loop, events, tag=0, prompt_logprobs=3),
            EngineRequest(short, GREEDY, 0, loop, events, tag=1),
            EngineRequest(normal, GREEDY, 6, loop, events, tag=2),
        ]

    seen, engine = run(bounded, requests_of)
    check_scored(bounded, full, seen[0], 3)
    assert seen[0][-1] == FinishEvent("length") and not any(isinstance(e, TokenEvent) for e in seen[0])
    assert seen[1] == [FinishEvent("length")]
    assert [e.token for e in seen[2] if isinstance(e, TokenEvent)] == tokens_alone(bounded, normal, GREEDY, 6)
    assert metric(engine, "windowlm_generation_tokens_total") == 6
    assert metric(engine, "windowlm_time_to_first_token_seconds_count") == 1  # of the generating request only
    assert metric(engine, "windowlm_prompt_tokens_total") == 24 + 10 + 12


def test_a_prompt_past_the_context_or_a_negative_max_tokens_is_refused(bounded) -> None:
    engine = Engine(bounded, metrics=Metrics(), max_batch_size=2, max_queue=2)
    engine.start()
    try:
        loop = asyncio.new_event_loop()
        with pytest.raises(ValueError, match="does not fit"):
            engine.submit([EngineRequest(random_prompt(25, 0), GREEDY, 0, loop, asyncio.Queue(), prompt_logprobs=0)])
        with pytest.raises(ValueError, match="max_tokens"):
            engine.submit([EngineRequest([1, 2], GREEDY, -1, loop, asyncio.Queue())])
        loop.close()
    finally:
        engine.shutdown()
        engine.join()


def test_scoring_beside_generating_requests_leaves_their_text_alone(model) -> None:
    """Long prompts read a chunk per step, scored and not, in one batch with greedy and seeded generation:
    every generated text is its text alone, and prompt logprob events are not counted as tokens."""
    sampled = SamplingParams(temperature=0.8, seed=7)
    prompts = [random_prompt(length, 10 + length) for length in (40, 23, 9, 33)]
    options = [(GREEDY, 8, 4), (GREEDY, 10, None), (sampled, 10, None), (GREEDY, 0, 0)]  # params, max, k

    def requests_of(loop, events) -> list[EngineRequest]:
        return [
            EngineRequest(prompt, params, most, loop, events, tag=i, prompt_logprobs=k)
            for i, (prompt, (params, most, k)) in enumerate(zip(prompts, options, strict=True))
        ]

    seen, _ = run(model, requests_of, prefill_chunk=8)
    for tag, (prompt, (params, most, k)) in enumerate(zip(prompts, options, strict=True)):
        tokens = [event.token for event in seen[tag] if isinstance(event, TokenEvent)]
        assert tokens == tokens_alone(model, prompt, params, most) if most else tokens == []
        assert seen[tag][-1] == FinishEvent("length")
        if k is None:
            assert not any(isinstance(event, PromptLogprobsEvent) for event in seen[tag])
        else:
            check_scored(model, prompt, seen[tag], k)


def test_a_scoring_chunk_that_fails_fails_its_request_alone(model) -> None:
    """The output head fails whenever it projects a whole chunk's positions, which only scoring does: the read
    of the three chunks together fails, each is read again alone, and only the scoring request ends with an
    error; the others run to their end."""
    prompts = [random_prompt(20, 20), random_prompt(20, 21), random_prompt(5, 22)]

    def requests_of(loop, events) -> list[EngineRequest]:
        return [
            EngineRequest(prompts[0], GREEDY, 5, loop, events, tag=0),
            EngineRequest(prompts[1], GREEDY, 5, loop, events, tag=1, prompt_logprobs=2),
            EngineRequest(prompts[2], GREEDY, 5, loop, events, tag=2),
        ]

    failures = []

    def break_the_output_head(engine: Engine) -> None:
        layers = engine.runner.decoder.layers
        project = layers.logits

        def fail_on_many_positions(hidden: torch.Tensor) -> torch.Tensor:
            if hidden.shape[1] == 8:  # a chunk's positions (the last tokens of three chunks are 3)
                failures.append(hidden.shape[1])
                raise RuntimeError("the output head failed")
            return project(hidden)

        layers.logits = fail_on_many_positions

    seen, _ = run(model, requests_of, prepare=break_the_output_head, prefill_chunk=8)
    assert failures == [8, 8]  # the scoring request's first chunk, together then alone, and nothing after it
    assert seen[1][-1].reason == "error" and "reading the prompt failed" in seen[1][-1].message
    assert not any(isinstance(event, (TokenEvent, PromptLogprobsEvent)) for event in seen[1])
    for tag in (0, 2):
        tokens = [event.token for event in seen[tag] if isinstance(event, TokenEvent)]
        assert tokens == tokens_alone(model, prompts[tag], GREEDY, 5)


def test_read_chunk_of_every_position_leaves_the_cache_as_the_normal_read(model) -> None:
    """Decoder.read_chunk with all_positions: (L, V) logits whose last row is the normal read's, and the same
    cache after it (the next decode steps agree)."""
    prompt = torch.tensor(random_prompt(16, 30))
    decoder = Decoder(model, num_slots=2, prefill_chunk=16)
    last = decoder.read_chunk(0, prompt)  # (V,)
    every = decoder.read_chunk(1, prompt, all_positions=True)  # (L, V)
    assert every.shape == (16, model.num_tokens)
    assert_close(every[-1], last)
    assert_close(torch.log_softmax(every, -1), full_forward_logprobs(model, prompt.tolist()))
    token = torch.tensor([7, 7])  # (2,)
    for _ in range(3):
        logits = decoder.decode(torch.tensor([0, 1]), token)  # (2, V)
        assert_close(logits[0], logits[1])
