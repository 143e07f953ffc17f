"""The bench model, decode steps of it ready to time, and timing in turns: what every decode figure is made of.

The model and its steps run on the device and in the dtype a bench is given (`--device`, `--dtype`). CUDA runs
kernels asynchronously, so every clock read here comes after a synchronisation with the GPU (`synchronize`).
"""

from __future__ import annotations

import argparse
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype. The CPU in float32 by default, so that figures stay comparable with older reports."""
    devices = ["auto", "cpu", "cuda"]
    parser.add_argument("--device", choices=devices, default="cpu", help="default: cpu; auto: CUDA when present")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="of the weights and cache (float32)")


def resolve_device(name: str) -> torch.device:
    """The torch device for a --device value; SystemExit with one line when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"windowlm bench: --device cuda, but this torch ({torch.__version__}) sees no CUDA device")
    return torch.device(name)


def synchronize() -> None:
    """Wait for the work queued on the GPU: CUDA kernels run asynchronously, so a clock read without this would
    time their launch, not their work. Nothing to wait for where this process never used CUDA."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def on_device(model: LocalTransformer, device: torch.device, dtype: torch.dtype) -> LocalTransformer:
    """The model moved to `device`, its parameters in `dtype` (buffers keep theirs, as load_checkpoint does)."""
    model.to(device)
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model.eval()


def device_state(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Where the model runs, for the report; on CUDA the GPU's name, its peak memory counted from here."""
    state: dict[str, Any] = {"type": device.type, "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        properties = torch.cuda.get_device_properties(device)
        state.update(name=torch.cuda.get_device_name(device), total_memory_mib=properties.total_memory / 2**20)
    return state


def finish_device_state(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`state` with the peak device memory this process allocated during the benchmark (CUDA only)."""
    if device.type == "cuda":
        synchronize()
        state["peak_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        state["peak_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return state


def timed(run: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls, each from a quiet GPU to the end of the work it queued."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def random_tokens(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count,), generator=torch.Generator().manual_seed(seed))


def prefilled_decoder(model: LocalTransformer, context: int) -> Decoder:
    """A one-slot Decoder whose slot holds `context` random tokens."""
    decoder = Decoder(model, num_slots=1, prefill_chunk=4 * model.local_attn_window_size)
    decoder.prefill(0, random_tokens(context))
    return decoder


def one_token_step(model: LocalTransformer, context: int) -> Callable[[], Any]:
    """A decode step of one slot holding `context` tokens, warmed up: each call decodes one more token."""
    decoder = prefilled_decoder(model, context)
    token = torch.tensor([7], device=decoder.cache.lengths.device)
    for _ in range(3):
        decoder.decode_all(token)
    return lambda: decoder.decode_all(token)


def filled_decoder(model: LocalTransformer, slots: int) -> tuple[Decoder, torch.Tensor]:
    """A Decoder with every slot busy, each at another position of its window, and a token for each (slots,)."""
    decoder = Decoder(model, num_slots=slots)
    for slot in range(slots):
        decoder.prefill(slot, random_tokens(300 + 37 * slot % 256, seed=slot))  # full caches, other offsets
    return decoder, random_tokens(slots).to(decoder.cache.lengths.device)


def batched_step(model: LocalTransformer, slots: int) -> Callable[[], Any]:
    """A decode step with every slot busy, each at another position of its window; warmed up."""
    decoder, tokens = filled_decoder(model, slots)
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
