"""The engine reads a prompt only from where it can still matter (model/receptive_field.py): the first token's
logprobs are the full forward's over the whole prompt, the text is that of reading everything, and the step
stats count every prompt token and, apart, the ones read. Scoring requests and --read-whole-prompt read all."""

from __future__ import annotations

import pytest
import torch

from model.receptive_field import prompt_reach, reading_start
from model.sampling import SamplingParams
from server.engine import Engine, EngineRequest, PromptLogprobsEvent, TokenEvent
from server.scheduler import PromptChunk, Scheduler, StepOutput, StepStats
from tests.generation import tokens_alone
from tests.server.conftest import make_checkpoint
from tests.server.test_prompt_logprobs import run as run_engine
from weights.io import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a thread pool only adds waiting

TOLERANCE = 1e-5
WINDOW = 8  # make_checkpoint's; depth 2, look_backward 1: R = 2 * 8 + 1 = 17
GREEDY = SamplingParams(temperature=0, logprobs=5)


@pytest.fixture(scope="module", params=[True, False], ids=["exact", "bucketed"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("reach") / "ckpt"
    make_checkpoint(folder, use_abs_pos_emb=False, max_seq_len=1, exact_windowsize=request.param)
    return load_checkpoint(folder)[0]


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, requests_of, **options) -> tuple[dict[int, list], dict[str, int]]:
    """Every event of the requests `requests_of(loop, events)`, by tag, and the prompt tokens the engine's
    steps counted: "prompt" (every token) and "read" (read into the cache)."""
    counted = {"prompt": 0, "read": 0}

    def count_prompt_tokens(engine: Engine) -> None:
        observe = engine.metrics.observe_step

        def observe_step(stats: StepStats) -> None:
            counted["prompt"] += stats.prompt_tokens
            counted["read"] += stats.prompt_tokens_read
            observe(stats)

        engine.metrics.observe_step = observe_step

    seen, _ = run_engine(model, requests_of, count_prompt_tokens, **{"max_batch_size": 4, **options})
    return seen, counted


def tokens(events: list) -> list[int]:
    return [event.token for event in events if isinstance(event, TokenEvent)]


@pytest.mark.parametrize("chunk", [None, 3 * WINDOW])
def test_the_first_token_has_the_full_forwards_logprobs_reading_only_the_tail(model, chunk: int | None) -> None:
    lengths = [300, 16, 17, 18, 3 * 17 + 17, 101]
    prompts = [random_prompt(length, seed) for seed, length in enumerate(lengths)]

    def requests_of(loop, events) -> list[EngineRequest]:
        return [EngineRequest(p, GREEDY, 6, loop, events, tag=i) for i, p in enumerate(prompts)]

    seen, counted = run(model, requests_of, prefill_chunk=chunk)
    assert prompt_reach(model) == 2 * WINDOW + 1
    for tag, prompt in enumerate(prompts):
        with torch.inference_mode():
            full = torch.log_softmax(model(torch.tensor(prompt)[None])[0, -1].float(), dim=-1)  # (V,)
        first = next(event for event in seen[tag] if isinstance(event, TokenEvent))
        values, ids = full.topk(5)
        assert [token for token, _ in first.top_logprobs] == ids.tolist()
        got = torch.tensor([value for _, value in first.top_logprobs])
        torch.testing.assert_close(got, values, atol=TOLERANCE, rtol=TOLERANCE)
        assert abs(first.logprob - float(full[first.token])) <= TOLERANCE
        assert tokens(seen[tag]) == tokens_alone(model, prompt, GREEDY, 6)  # the oracle reads everything
    reach, aligned = prompt_reach(model), chunk or WINDOW
    read = sum(length - reading_start(length, reach, WINDOW, aligned) for length in lengths)
    assert read < sum(lengths) - 250  # the 300-token prompt is read from 280 (chunk 8) or 264 (chunk 24)
    assert counted == {"prompt": sum(lengths), "read": read}


def test_scoring_requests_and_the_setting_read_every_prompt_token(model) -> None:
    """An echo + logprobs request needs the prompt's own logprobs: it reads (and scores) all of it; with
    read_whole_prompt every request does, with the same text."""
    prompts = [random_prompt(120, 1), random_prompt(90, 2)]

    def requests_of(loop, events) -> list[EngineRequest]:
        return [
            EngineRequest(prompts[0], GREEDY, 4, loop, events, tag=0, prompt_logprobs=0),
            EngineRequest(prompts[1], GREEDY, 4, loop, events, tag=1),
        ]

    seen, counted = run(model, requests_of)
    scored = [event for event in seen[0] if isinstance(event, PromptLogprobsEvent)]
    assert sum(len(event.token_logprobs) for event in scored) == 119
    skipped = reading_start(90, prompt_reach(model), WINDOW, WINDOW)
    assert skipped > 0
    assert counted == {"prompt": 210, "read": 210 - skipped}
    whole, counted = run(model, requests_of, read_whole_prompt=True)
    assert counted == {"prompt": 210, "read": 210}
    for tag, prompt in enumerate(prompts):
        assert tokens(seen[tag]) == tokens(whole[tag]) == tokens_alone(model, prompt, GREEDY, 4)


def test_simultaneous_prompts_of_different_lengths_give_their_text_alone(model) -> None:
    """More requests than slots, greedy, seeded and penalised, prompts from shorter than R to many windows long:
    batched, each gives the text it gives alone (the oracle reads, and its sampler sees, its whole prompt)."""
    lengths = [5, 260, 17, 64, 133, 40, 999]
    prompts = [random_prompt(length, 50 + length) for length in lengths]
    params = [GREEDY if i % 2 else SamplingParams(temperature=0.9, seed=i) for i in range(len(lengths))]
    # The penalties count every prompt token, also those never read: a repetition penalty on the whole prompt.
    params[3] = SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=1.0, logprobs=5)

    def requests_of(loop, events) -> list[EngineRequest]:
        return [EngineRequest(p, params[i], 12, loop, events, tag=i) for i, p in enumerate(prompts)]

    seen, _ = run(model, requests_of, prefill_chunk=2 * WINDOW)
    for tag, prompt in enumerate(prompts):
        assert tokens(seen[tag]) == tokens_alone(model, prompt, params[tag], 12)


def test_the_scheduler_starts_a_slot_at_its_reading_start_and_counts_skipped_tokens() -> None:
    """Chunks begin at the start the runner gives; every prompt token is counted once, the read ones apart."""
    scheduler = Scheduler(2, 2, chunk_end=lambda start, end: min(end, start // 8 * 8 + 8), reading_start=lambda r: 16)
    request = EngineRequest(list(range(30)), GREEDY, 3, None, None)
    scheduler.add([request])
    (taken,) = scheduler.take_waiting()
    slot = scheduler.admit(taken)
    assert (scheduler.slots[slot].prefilled, scheduler.slots[slot].read_from) == (16, 16)
    for start, end in [(16, 24), (24, 30)]:
        plan = scheduler.plan()
        assert [(chunk.start, chunk.end) for chunk in plan.prompt_chunks] == [(start, end)]
        scheduler.record(plan, StepOutput(read=[PromptChunk(slot, request, start, end)]))
    stats = scheduler.take_stats()
    assert (stats.prompt_tokens, stats.prompt_tokens_read) == (30, 14)
