"""`windowlm bench decode`: decode speed and memory of the sliding cache, against the reference, as JSON.

Every figure comes from one run on one machine with the same weights, so ratios between them are meaningful
even where the machine is noisy. The default model is local-attention's train.py model scaled down: dim 256,
depth 4, heads 4, dim_head 64, window 256, dynamic position bias, one residual stream.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from model import LocalTransformer
from model.decoder import Decoder

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


def resident_bytes() -> int:
    """Resident set size of this process now (Linux), or the peak elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def decode_ms_per_token(model: LocalTransformer, contexts: list[int], steps: int, rounds: int) -> dict[str, float]:
    """Milliseconds of one decode step (batch 1) with each context in the slot, the contexts in turns."""
    runs = {context: (one_token_step(model, context), steps) for context in contexts}
    return {str(context): seconds * 1000 for context, seconds in median_seconds_in_turns(runs, rounds).items()}


def batched_tokens_per_second_in_turns(
    model: LocalTransformer, batches: list[int], steps: int, rounds: int
) -> dict[str, float]:
    """Decode throughput at each batch size, from the median step, the sizes timed in turns."""
    runs = {slots: (batched_step(model, slots), steps) for slots in batches}
    return {str(slots): slots / seconds for slots, seconds in median_seconds_in_turns(runs, rounds).items()}


def memory_over_long_generation(model: LocalTransformer, tokens: int) -> dict[str, float]:
    """Resident memory before and after generating `tokens` greedy tokens in one slot."""
    decoder = Decoder(model, num_slots=1)
    logits = decoder.prefill(0, random_tokens(1000))
    gc.collect()
    before = resident_bytes()
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decoder.decode_all(logits.argmax(dim=-1, keepdim=True))[0]
    seconds = time.perf_counter() - start
    gc.collect()
    after = resident_bytes()
    return {
        "generated_tokens": tokens,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "growth_fraction": (after - before) / before,
        "ms_per_token": seconds / tokens * 1000,
    }


class ReferenceLoop:
    """local-attention's generate loop, one token per call: a forward over the last max_seq_len tokens (with
    or without its cache) and the argmax appended.

    With the cache the first step runs the whole prompt; it is taken here, before any step is timed.
    """

    def __init__(self, reference: torch.nn.Module, context: int, use_kv_cache: bool) -> None:
        self.reference = reference
        self.use_kv_cache = use_kv_cache
        self.out = random_tokens(context)[None]  # (1, n)
        self.cache = None
        if use_kv_cache:
            self.step()

    @torch.no_grad()
    def step(self) -> None:
        window = self.out[:, -self.reference.max_seq_len :]
        if self.use_kv_cache:
            logits, self.cache = self.reference(window, cache=self.cache, return_cache=True)
        else:
            logits = self.reference(window)
        self.out = torch.cat((self.out, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)


def paired_ms_per_token(
    model: LocalTransformer, reference: torch.nn.Module, context: int, steps: int, reference_steps: int, rounds: int
) -> tuple[float, float]:
    """Median milliseconds per token of our decode step and the reference's cached generate loop at `context`,
    timed in turns."""
    loop = ReferenceLoop(reference, context, use_kv_cache=True)
    runs = {"ours": (one_token_step(model, context), steps), "reference": (loop.step, reference_steps)}
    seconds = median_seconds_in_turns(runs, rounds)
    return seconds["ours"] * 1000, seconds["reference"] * 1000


def linear_shapes(model: LocalTransformer) -> list[tuple[int, int]]:
    """(in, out) of every matrix a decode step multiplies by, once per token."""
    per_token = [*model.layers.modules(), *model.to_logits.modules()]  # not the position-bias MLP
    return [(m.in_features, m.out_features) for m in per_token if isinstance(m, torch.nn.Linear)]


def decode_flops_per_token(model: LocalTransformer, capacity: int) -> float:
    """Multiply-adds x 2 of one decode token: the linear layers plus attention over a full cache."""
    linear = sum(2 * n_in * n_out for n_in, n_out in linear_shapes(model))
    attention = sum(4 * layer.heads * layer.dim_head * capacity for layer in model.attention_layers)
    return linear + attention


def matmul_roofline_flops(model: LocalTransformer, batch: int, repeats: int = 50) -> float:
    """FLOP/s of plain matmuls of the decode step's own shapes at this batch size."""
    shapes = linear_shapes(model)
    inputs = [torch.randn(batch, n_in) for n_in, _ in shapes]
    weights = [torch.randn(n_out, n_in) for n_in, n_out in shapes]

    def run() -> None:
        for x, w in zip(inputs, weights, strict=True):
            torch.nn.functional.linear(x, w)

    for _ in range(5):
        run()
    seconds = statistics.median(timed(run, repeats))
    return sum(2 * batch * n_in * n_out for n_in, n_out in shapes) / seconds


def decode_bytes_per_step(model: LocalTransformer, kv_bytes_per_slot: int, batch: int) -> int:
    """Bytes one decode step must read at least: every weight matrix once, and each slot's whole cache."""
    weights = sum(n_in * n_out for n_in, n_out in linear_shapes(model)) * next(model.parameters()).element_size()
    return weights + batch * kv_bytes_per_slot


def read_bandwidth(total_bytes: int, repeats: int = 20) -> float:
    """Bytes/s of streaming reads over a working set of `total_bytes` (a sum over four tensors): the memory
    roofline of a step that reads that much."""
    chunks = [torch.ones(max(1, total_bytes // 16)) for _ in range(4)]  # four float32 tensors

    def run() -> None:
        for chunk in chunks:
            chunk.sum()

    run()
    return sum(chunk.nbytes for chunk in chunks) / statistics.median(timed(run, repeats))


def mistral_figures(model_kwargs: dict, context: int, batches: list[int], steps: int) -> dict[str, Any]:
    """HuggingFace transformers' MistralForCausalLM of the same size with its sliding-window cache."""
    try:
        from transformers import MistralConfig, MistralForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed (pip install 'windowlm[bench]')"}
    dim = model_kwargs["dim"]
    config = MistralConfig(
        vocab_size=256,
        hidden_size=dim,
        intermediate_size=int(dim * 4 * 2 / 3),
        num_hidden_layers=model_kwargs["depth"],
        num_attention_heads=model_kwargs["heads"],
        num_key_value_heads=model_kwargs["heads"],
        head_dim=model_kwargs["dim_head"],
        sliding_window=model_kwargs["local_attn_window_size"],
        max_position_embeddings=context + steps + 64,
        attn_implementation="sdpa",
    )
    mistral = MistralForCausalLM(config).eval()
    figures: dict[str, Any] = {"transformers_context": context}
    with torch.no_grad():
        for batch in batches:
            prompt = torch.randint(0, 256, (batch, context))
            out = mistral(prompt, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

            def step() -> None:
                nonlocal past, token
                result = mistral(token, past_key_values=past, use_cache=True)
                past, token = result.past_key_values, result.logits[:, -1:].argmax(-1)

            for _ in range(3):
                step()
            seconds = statistics.median(timed(step, steps))
            figures[f"batch_{batch}"] = {"ms_per_step": seconds * 1000, "tokens_per_second": batch / seconds}
    return figures


def run_decode_bench(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    max_context = max(args.contexts)
    model_kwargs = dict(BENCH_MODEL, max_seq_len=max_context + 1024)
    model = LocalTransformer(**model_kwargs).eval()
    load_before = os.getloadavg()

    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
        },
        "model": dict(model_kwargs),
    }
    decoder = Decoder(model, num_slots=1)
    capacity = decoder.cache.capacity
    report["model"]["kv_cache_positions_per_layer"] = capacity
    report["model"]["kv_cache_bytes_per_slot"] = decoder.cache.nbytes()

    per_token = decode_ms_per_token(model, args.contexts, args.steps, args.rounds)
    report["decode_ms_per_token"] = per_token
    report["context_ratio_largest_to_smallest"] = per_token[str(max_context)] / per_token[str(min(args.contexts))]

    throughput = batched_tokens_per_second_in_turns(model, args.batches, args.steps, args.rounds)
    report["batched_tokens_per_second"] = throughput
    if "1" in throughput and "32" in throughput:
        report["batch_32_over_batch_1"] = throughput["32"] / throughput["1"]

    flops_per_token = decode_flops_per_token(model, capacity)
    roofline = {}
    for batch in (1, 32):
        if str(batch) in throughput:
            achieved = flops_per_token * throughput[str(batch)]
            peak = matmul_roofline_flops(model, batch)
            roofline[str(batch)] = {
                "decode_gflops": achieved / 1e9,
                "matmul_gflops": peak / 1e9,
                "fraction": achieved / peak,
            }
    report["roofline"] = {"decode_flops_per_token": flops_per_token, "by_batch": roofline}

    memory = {}
    for batch, tokens_per_second in throughput.items():
        step_bytes = decode_bytes_per_step(model, decoder.cache.nbytes(), int(batch))
        achieved, peak = step_bytes * tokens_per_second / int(batch), read_bandwidth(step_bytes)
        memory[batch] = {
            "bytes_per_step": step_bytes,
            "decode_gb_per_second": achieved / 1e9,
            "read_gb_per_second": peak / 1e9,
            "fraction": achieved / peak,
        }
    report["memory_roofline"] = memory

    if args.reference:
        report["reference"] = reference_figures(model, model_kwargs, args)
        speedup_8k = report["reference"].get("cached_over_ours", {}).get("8192")
        if speedup_8k:
            report["speedup_over_reference_cached_at_8k"] = speedup_8k
    if args.mistral:
        mistral = mistral_figures(model_kwargs, 512, [b for b in (1, 32) if str(b) in throughput], args.steps)
        report["transformers_mistral"] = mistral
        for batch in ("1", "32"):
            theirs = mistral.get(f"batch_{batch}", {}).get("tokens_per_second")
            if theirs:
                report[f"over_mistral_batch_{batch}"] = throughput[batch] / theirs
    if args.long_tokens:
        streaming = LocalTransformer(**dict(model_kwargs, use_abs_pos_emb=False)).eval()
        report["memory"] = memory_over_long_generation(streaming, args.long_tokens)

    report["machine"]["load_average_after"] = os.getloadavg()
    return report


def reference_figures(model: LocalTransformer, model_kwargs: dict, args: argparse.Namespace) -> dict[str, Any]:
    """local-attention's own generate loop on the same weights: cached (timed in turns with ours) and uncached."""
    try:
        import local_attention
    except ImportError:
        return {"skipped": "local-attention is not installed (pip install 'windowlm[dev]')"}
    reference = local_attention.LocalTransformer(**model_kwargs).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    cached, ours, uncached = {}, {}, {}
    for context in args.contexts:
        ours[str(context)], cached[str(context)] = paired_ms_per_token(
            model, reference, context, args.steps, args.reference_tokens, args.rounds
        )
        if context <= args.uncached_up_to:
            loop = ReferenceLoop(reference, context, use_kv_cache=False)
            uncached[str(context)] = statistics.median(timed(loop.step, 2)) * 1000
    return {
        "cached_ms_per_token": cached,
        "ours_ms_per_token_in_turns": ours,
        "cached_over_ours": {context: cached[context] / ours[context] for context in cached},
        "uncached_ms_per_token": uncached,
    }


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    def numbers(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part]

    parser.add_argument("--contexts", type=numbers, default=[512, 8192, 65536])
    parser.add_argument("--batches", type=numbers, default=[1, 8, 32, 64])
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps per figure")
    parser.add_argument("--long-tokens", type=int, default=100_000, help="tokens for the memory figure (0: skip)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--reference-tokens", type=int, default=32, help="timed reference tokens per context")
    parser.add_argument("--rounds", type=int, default=8, help="turns taken by the figures timed in turns")
    parser.add_argument("--uncached-up-to", type=int, default=8192, help="largest context for uncached figures")
    parser.add_argument("--mistral", action=argparse.BooleanOptionalAction, default=True)
