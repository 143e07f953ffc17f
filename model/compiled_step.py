"""The decode step as one graph: static shapes, no host synchronisation, compiled before it is used.

`DecodeGraph` is a decode step of the first B slots written as a function of tensors only: the cache's buffers,
the slots' positions and the tokens go in, logits come out, and the step's keys, values and positions are
written in place. Every index (ring rows, visibility, rotary angles, bias rows) is computed from those tensors on
their device, and nothing in it asks the device for a value, so torch.compile captures it whole: on a CPU as
fused C++ kernels with the weights frozen into packed matrix-product kernels, on a GPU as CUDA graphs
replayed per step.

`CompiledDecode` compiles it before the first request, so no request pays a compile: on CUDA once per bucket
of batch sizes (vLLM's CUDA-graph batch sizes do the same), a step over fewer slots running the smallest
bucket that holds them; on a CPU for batch 1, for all the slots, and once for every batch between. A step over slots
first..last runs slots 0..last (or up to the bucket): the others ride along without advancing (Decoder.step).

The compiled step holds the weights as they were when it was compiled and runs on as many torch threads as
there were then (inductor builds its CPU kernels for that count). It does not check a model's
max_seq_len (that needs the positions on the host): its caller keeps positions in range (the server's
scheduler does) and positions past it are clamped, never read out of bounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch._inductor.config
from torch import Tensor, nn

from model.cache import SlidingKVCache
from model.step import CachedLayers, StepPlanner

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class DecodeGraph(nn.Module):
    """A decode step of slots 0..B-1 as a function of tensors, for torch.compile."""

    def __init__(self, model: nn.Module, planner: StepPlanner, cache_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.planner = planner
        self.cache_shape = cache_shape  # (layers, slots, heads, capacity, dim_head)

    def forward(
        self, tokens: Tensor, advance: Tensor, key_rows: Tensor, value_rows: Tensor, lengths: Tensor, starts: Tensor
    ) -> Tensor:
        """Tokens (B,) for slots 0..B-1, `advance` (B,) 1 for the slots that take them and 0 for those riding
        along -> next-token logits (B, V). Writes the slots' keys and values into the cache's buffers `key_rows`
        and `value_rows` (see SlidingKVCache) and adds `advance` to `lengths` (slots,)."""
        batch = tokens.shape[0]
        slots = slice(0, batch)
        cache = SlidingKVCache.over(key_rows, value_rows, lengths, starts, self.cache_shape)
        positions = lengths[slots][:, None].clone()  # (B, 1)
        plan = self.planner.plan(cache, slots, positions)
        plan.for_compiler = True
        x = self.model.embed(tokens[:, None], positions * advance[:, None], checked=False)  # (B, 1, dim)
        layers = CachedLayers(self.model)  # traced once: the records name the model's own parameters
        logits = layers.logits(layers.run(x, plan))[:, 0]  # (B, V)
        lengths[slots] += advance
        return logits


def bucket_sizes(num_slots: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> list[int]:
    """The batch buckets compiled for a cache of `num_slots`: those below it, and the whole cache."""
    return sorted({size for size in buckets if 0 < size < num_slots} | {num_slots})


def inductor_settings(device: torch.device) -> dict:
    """Inductor's settings while the step compiles (they are read then, and torch.compile's `options` does not
    reach the freezing pass). On a CPU the weights are frozen as constants, and max-autotune lets inductor choose
    its own packed C++ matrix-product kernels where they beat BLAS: at decode batch sizes the BLAS product is
    several times slower than reading the weights once."""
    if device.type == "cuda":
        return {"freezing": True}
    return {
        "freezing": True,
        "max_autotune": True,
        "max_autotune_gemm_backends": "CPP,ATEN",
        "autotune_num_choices_displayed": 0,  # no tables of kernel timings on stderr (the log says what compiles)
        "max_autotune_report_choices_stats": False,
    }


class CompiledDecode:
    """DecodeGraph compiled ahead of use for one cache; call it with the tokens and advance of slots 0..B-1.

    With static `buckets` (the default on CUDA, where each is captured as CUDA graphs) a step runs the smallest
    bucket that holds its slots. Without (the default on a CPU) there are three graphs: batch 1, all the slots,
    and one for the batches between, whose size is a symbol of the graph; every batch runs at its own size, no
    slot is padded, and the compiling (tens of seconds a graph on a small CPU) is done three times, not once per
    bucket.
    """

    def __init__(self, graph: DecodeGraph, cache: SlidingKVCache, buckets: Sequence[int] | None = None) -> None:
        if not hasattr(torch.compiler, "set_stance") or not hasattr(torch._dynamo.config, "recompile_limit"):
            raise RuntimeError(f"compiling the decode step needs torch 2.7 or later, not {torch.__version__}")
        self.cache = cache
        device = cache.keys.device
        if buckets is None and device.type == "cuda":
            buckets = DEFAULT_BUCKETS
        self.buckets = None if buckets is None else bucket_sizes(cache.num_slots, buckets)
        # dynamo keeps a list of compiled graphs per function, capped by this: room for every bucket
        limit = 2 + (3 if self.buckets is None else len(self.buckets))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        if device.type == "cuda":
            for buffer in (cache.key_rows, cache.value_rows, cache.lengths, cache.starts):
                torch._dynamo.mark_static_address(buffer)  # the same memory every replay: CUDA graphs may write it
        self.settings = inductor_settings(device)
        self.warm = False  # every graph compiled
        self.threads = torch.get_num_threads()  # that it was compiled for
        self.cuda = device.type == "cuda"
        mode = "reduce-overhead" if self.cuda else None
        self.step = torch.compile(graph, mode=mode, fullgraph=True, dynamic=False if self.buckets else None)

    def bucket(self, slots: int) -> int:
        """The batch a step over the first `slots` slots runs at: the smallest bucket that holds them, or `slots`
        itself without buckets."""
        if not 0 < slots <= self.cache.num_slots:
            raise ValueError(f"{slots} slots do not fit a cache of {self.cache.num_slots}")
        if self.buckets is None:
            return slots
        return next(size for size in self.buckets if size >= slots)

    def __call__(self, tokens: Tensor, advance: Tensor) -> Tensor:
        """Tokens and advance (B,) of slots 0..B-1, B from `bucket` -> logits (B, V), as DecodeGraph."""
        cache = self.cache
        inputs = (tokens, advance, cache.key_rows, cache.value_rows, cache.lengths, cache.starts)
        if self.warm and torch.get_num_threads() != self.threads:
            raise RuntimeError(
                f"the decode step was compiled for {self.threads} torch threads, not {torch.get_num_threads()}: "
                "its kernels are built for that many (keep the count fixed, or compile again)"
            )
        if not self.warm:
            with torch.inference_mode(), torch._inductor.config.patch(self.settings):
                return self.step(*inputs)
        # Every graph is compiled and every call passes the same buffers: of dynamo's guards only those telling
        # the graphs apart need checking (checking them all costs a sixth of a batch-1 step), and a call that
        # would compile again (minutes, without these settings) raises instead: the Decoder then runs eagerly
        with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
            logits = self.step(*inputs)
        # CUDA graphs write every replay's output to the same memory: a copy, to outlive the next step
        return logits.clone() if self.cuda else logits

    def warm_up(self, progress: Callable[[str], None] | None = None) -> float:
        """Compile every graph now (steps of riders only: they write nothing a later step reads) -> seconds."""
        started = time.perf_counter()
        device = self.cache.keys.device
        slots = self.cache.num_slots
        sizes = self.buckets or sorted({1, slots} | ({2} if slots > 2 else set()))
        for number, size in enumerate(sizes, 1):
            tokens = torch.zeros(size, dtype=torch.long, device=device)
            advance = torch.zeros_like(tokens)
            symbolic = self.buckets is None and 1 < size < slots
            if symbolic:  # one graph for batches 2 to slots - 1 (all the slots slice nothing: a graph of its own)
                torch._dynamo.mark_dynamic(tokens, 0)
                torch._dynamo.mark_dynamic(advance, 0)
            for _ in range(3 if self.cuda else 1):  # CUDA graphs are recorded at the second or third call
                self(tokens, advance)
            if progress is not None:
                elapsed = time.perf_counter() - started
                what = f"batches 2-{slots - 1}" if symbolic else f"batch {size}"
                progress(f"compiled decode step {number}/{len(sizes)} ({what}) in {elapsed:.1f} s")
        self.warm, self.threads = True, torch.get_num_threads()
        return time.perf_counter() - started
