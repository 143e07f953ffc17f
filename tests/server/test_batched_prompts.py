"""The engine reads the prompt chunks of every slot still reading its prompt in one call per step, within the
per-step prompt-token budget: simultaneous prompts give, batched, the same text as alone, and a read that
fails is read again chunk by chunk, so that only the prompt that cannot be read fails."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine import Engine, EngineRequest, FinishEvent, TokenEvent
from server.faults import FaultInjector
from server.metrics import Metrics
from tests.server.conftest import make_checkpoint
from tests.server.test_engine import GREEDY, alone, collect
from weights.io import load_checkpoint

CHUNK = 8  # the test checkpoint's window: prompts of 3..40 tokens end mid-chunk, on a chunk, after one token


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    folder = make_checkpoint(tmp_path_factory.mktemp("batched") / "ckpt", use_abs_pos_emb=False, max_seq_len=1)
    return load_checkpoint(folder)[0]


def prompts_of(lengths: list[int]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (length,), generator=generator).tolist() for length in lengths]


def record_reads(engine: Engine) -> list[list[int]]:
    """The chunk lengths of every Decoder.read_chunks call the engine makes (the real call runs)."""
    decoder, reads = engine.runner.decoder, []
    read_chunks = decoder.read_chunks

    def recorded(slots, chunks, all_positions=None):
        reads.append([len(chunk) for chunk in chunks])
        return read_chunks(slots, chunks, all_positions)

    decoder.read_chunks = recorded
    return reads


def run_together(model, prompts: list[list[int]], tokens: int, **options) -> tuple[dict[int, list], list]:
    """Submit every prompt at once -> each request's events by tag, and the chunk lengths of each read (whole
    prompts: the test model's reach is shorter than the longest)."""
    options = {"max_batch_size": len(prompts), "max_queue": 0, "prefill_chunk": CHUNK, **options}
    options.setdefault("read_whole_prompt", True)
    engine = Engine(model, metrics=Metrics(), **options)
    reads = record_reads(engine)

    async def scenario() -> dict[int, list]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        engine.submit([EngineRequest(p, GREEDY, tokens, loop, events, tag=i) for i, p in enumerate(prompts)])
        return await collect(events, len(prompts))

    engine.start()
    try:
        return asyncio.run(scenario()), reads
    finally:
        engine.shutdown()
        engine.join()


@pytest.mark.parametrize("budget", [None, 2 * CHUNK, 1])
def test_simultaneous_prompts_of_different_lengths_give_their_text_alone(model, budget: int | None) -> None:
    lengths = [40, 3, 17, 1, 8, 29]
    prompts = prompts_of(lengths)
    seen, reads = run_together(model, prompts, 12, prompt_tokens_per_step=budget)
    for tag, prompt in enumerate(prompts):
        assert [e.token for e in seen[tag] if isinstance(e, TokenEvent)] == alone(model, prompt, 12)
        assert seen[tag][-1] == FinishEvent("length")
    assert sum(map(sum, reads)) == sum(lengths)  # every prompt token read once
    if budget is None:
        assert reads[0] == [CHUNK, 3, CHUNK, 1, CHUNK, CHUNK]  # the first step reads a chunk of every prompt
    elif budget == 1:
        assert all(len(read) == 1 for read in reads)  # over the budget: one chunk a step
    else:
        assert max(len(read) for read in reads) > 1 and all(sum(read) <= budget for read in reads)


def test_a_prompt_that_cannot_be_read_fails_alone_and_the_others_keep_their_text(model, caplog) -> None:
    prompts = prompts_of([20, 13, 5])
    prompts[1][:5] = list(b"FAULT")
    seen, reads = run_together(model, prompts, 10, faults=FaultInjector(chunk_marker=b"FAULT"))
    assert "reading 3 prompt chunks together failed" in caplog.text
    assert reads[:2] == [[CHUNK], [5]]  # then each alone: the first and last read, the faulty one raised again
    failed = seen[1][-1]
    assert failed.reason == "error" and "reading the prompt failed: injected fault" in failed.message
    assert not any(isinstance(event, TokenEvent) for event in seen[1])
    for tag in (0, 2):
        assert [e.token for e in seen[tag] if isinstance(e, TokenEvent)] == alone(model, prompts[tag], 10)
