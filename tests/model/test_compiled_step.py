"""The compiled decode step (model.compiled_step): one graph with no breaks, and the same logits, positions and
cache as the eager step, over batches with slots riding along.

Compiling takes a while (inductor builds C++ kernels: seconds to a minute a graph on a small CPU, less once its
disk cache holds them), so the comparison runs on a few layouts, most with a single static bucket.
"""

from __future__ import annotations

import pytest
import torch

from model.compiled_step import CompiledDecode, DecodeGraph, bucket_sizes
from model.decoder import Decoder
from tests.model.test_receptive_field import LAYOUTS, layout

SLOTS = 5
# The test models' logits are scaled up 4x (greedy choices far from ties), and so is rounding: the compiled
# matrix products add in another order, which moves these logits by up to ~1.3e-5 (the bench model's by ~1e-6)
TOLERANCE = 2e-5
PROMPT_LENGTHS = [5, 11, 1, 8, 3]  # mid-window, past a window, one token, on a window


def decoders(name: str) -> tuple[Decoder, Decoder]:
    """An eager decoder and a twin (not yet compiled) over one model, each slot holding the same prompt."""
    net, chunk = layout(name)
    generator = torch.Generator().manual_seed(3)
    pair = (Decoder(net, SLOTS, prefill_chunk=chunk), Decoder(net, SLOTS, prefill_chunk=chunk))
    for slot, length in enumerate(PROMPT_LENGTHS):
        prompt = torch.randint(0, 64, (length,), generator=generator)
        for decoder in pair:
            decoder.prefill(slot, prompt)
    return pair


def graph_inputs(decoder: Decoder, batch: int) -> tuple[torch.Tensor, ...]:
    cache = decoder.cache
    tokens = torch.arange(batch) + 7
    return tokens, torch.ones(batch, dtype=torch.long), cache.key_rows, cache.value_rows, cache.lengths, cache.starts


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_decode_step_is_one_graph(name: str) -> None:
    """torch._dynamo.explain: no graph break (no host synchronisation, no data-dependent branch) in any layout."""
    eager, _ = decoders(name)
    graph = DecodeGraph(eager.model, eager.planner, tuple(eager.cache.keys.shape))
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(graph)(*graph_inputs(eager, SLOTS))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def run_both(eager: Decoder, compiled: Decoder, plan: list[tuple[int, int, list[int] | None]]) -> None:
    """Decode steps over slot ranges [first, stop) (riders: slots whose advance is 0) on both decoders: the
    logits agree within TOLERANCE (absolute, plus as much relative) and the positions exactly."""
    generator = torch.Generator().manual_seed(5)
    for first, stop, advance in plan:
        tokens = torch.randint(0, 64, (stop - first,), generator=generator)
        moves = None if advance is None else torch.tensor(advance, dtype=torch.bool)
        expected = eager.decode(slice(first, stop), tokens, moves)
        got = compiled.decode(slice(first, stop), tokens, moves)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
        assert torch.equal(compiled.cache.lengths, eager.cache.lengths)


STEPS = [(0, 5, None), (0, 1, None), (1, 3, None), (0, 5, [1, 0, 1, 1, 0]), (2, 4, None), (0, 4, None), (3, 5, None)]
STEPS *= 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bucketed-dynamic-bias-shared-qk", "exact-abs-pos-streams"])
def test_compiled_step_equals_eager_in_a_bucket(name: str) -> None:
    """A static bucket (the CUDA layout, here on the CPU): steps over fewer slots are padded with riders, whose
    positions stay and whose writes no later step reads."""
    eager, compiled = decoders(name)
    compiled.compile(buckets=[SLOTS])  # one graph: every step below is padded to all the slots
    assert [compiled.compiled.bucket(size) for size in (1, 2, 3)] == [SLOTS] * 3
    run_both(eager, compiled, STEPS)
    greedy_equal(eager, compiled)
    assert compiled.compiled_failures == 0


def greedy_equal(eager: Decoder, compiled: Decoder, tokens: int = 24) -> None:
    """Every slot continues greedily to the same tokens."""
    fed = torch.tensor([1, 2, 3, 4, 5])
    for _ in range(tokens):
        expected = eager.decode_all(fed)
        got = compiled.decode_all(fed)
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)
        fed = expected.argmax(dim=-1)
        assert torch.equal(got.argmax(dim=-1), fed)


@pytest.mark.slow
def test_compiled_step_on_the_cpu_graphs() -> None:
    """The CPU default: graphs for batch 1, all slots and a symbolic batch between, each batch at its own size;
    progress is reported per graph."""
    eager, compiled = decoders("bucketed-lb2-streams-gates-qknorm")
    lines: list[str] = []
    seconds = compiled.compile(progress=lines.append)
    assert seconds > 0 and len(lines) == 3 and "batches 2-4" in lines[1]
    assert [compiled.compiled.bucket(size) for size in range(1, 6)] == [1, 2, 3, 4, 5]
    run_both(eager, compiled, STEPS)
    greedy_equal(eager, compiled)

    assert compiled.compiled_failures == 0  # no step compiled again after the warm-up, none ran eagerly

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # the kernels are built for `threads`: not a recompile, the eager step
    try:
        fed = torch.tensor([1, 2, 3, 4, 5])
        torch.testing.assert_close(compiled.decode_all(fed), eager.decode_all(fed), atol=TOLERANCE, rtol=TOLERANCE)
        assert compiled.compiled_failures == 1
        assert f"compiled for {threads} torch threads" in compiled.last_compiled_failure
    finally:
        torch.set_num_threads(threads)
    compiled.decode_all(fed)
    assert compiled.compiled_failures == 1


def test_bucket_sizes() -> None:
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(5, (1, 8)) == [1, 5]
    assert bucket_sizes(1) == [1]


def test_a_batch_larger_than_the_cache_is_refused() -> None:
    eager, _ = decoders("exact-lb1")
    graph = DecodeGraph(eager.model, eager.planner, tuple(eager.cache.keys.shape))
    steps = CompiledDecode(graph, eager.cache, buckets=[1, 3])
    assert [steps.bucket(size) for size in (1, 2, 3, 4)] == [1, 3, 3, SLOTS]
    with pytest.raises(ValueError, match="do not fit"):
        steps.bucket(SLOTS + 1)
