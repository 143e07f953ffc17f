"""The bench model, decode steps of it ready to time, and timing in turns: what every decode figure is made of."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from model import LocalTransformer
from model.decoder import Decoder

# local-attention's train.py model scaled down: dim 256, depth 4, heads 4, dim_head 64, window 256, dynamic
# position bias, one residual stream.
BENCH_MODEL = dict(
    num_tokens=256,
    dim=256,
    depth=4,
    heads=4,
    dim_head=64,
    local_attn_window_size=256,
    use_dynamic_pos_bias=True,
    num_residual_streams=1,
)

WARMUP_STEPS = 10  # untimed steps at the start of each turn of measurements taken in turns


def timed(run: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def random_tokens(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count,), generator=torch.Generator().manual_seed(seed))


def one_token_step(model: LocalTransformer, context: int) -> Callable[[], Any]:
    """A decode step of one slot holding `context` tokens, warmed up: each call decodes one more token."""
    decoder = Decoder(model, num_slots=1, prefill_chunk=4 * model.local_attn_window_size)
    decoder.prefill(0, random_tokens(context))
    token = torch.tensor([7])
    for _ in range(3):
        decoder.decode_all(token)
    return lambda: decoder.decode_all(token)


def batched_step(model: LocalTransformer, slots: int) -> Callable[[], Any]:
    """A decode step with every slot busy, each at another position of its window; warmed up."""
    decoder = Decoder(model, num_slots=slots)
    for slot in range(slots):
        decoder.prefill(slot, random_tokens(300 + 37 * slot % 256, seed=slot))  # full caches, other offsets
    tokens = random_tokens(slots)
    for _ in range(3):
        decoder.decode_all(tokens)
    return lambda: decoder.decode_all(tokens)


def median_seconds_in_turns(runs: dict[Any, tuple[Callable[[], Any], int]], rounds: int) -> dict[Any, float]:
    """Median seconds of a call of each run (a callable and its number of timed calls in all), the runs timed
    in turns over `rounds` rounds so that a slow spell of the machine falls on all of them alike.

    Each turn first makes untimed calls: after another run's turn a run needs several calls to be back at
    the speed it has in a loop of its own (the reference's generate about eight, allocating MiBs per step).
    """
    times: dict[Any, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, (run, calls) in runs.items():
            times[key] += timed(run, WARMUP_STEPS + max(1, calls // rounds))[WARMUP_STEPS:]
    return {key: statistics.median(values) for key, values in times.items()}
