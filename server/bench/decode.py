"""`windowlm bench decode`: decode speed and memory of the sliding cache, against the reference, as JSON.

Every figure comes from one run on one machine with the same weights, so ratios between them are meaningful
even where the machine is noisy. The model is timing.BENCH_MODEL: local-attention's train.py model scaled down,
on the CPU in float32 unless --device / --dtype say otherwise; --quick takes fewer steps, rounds and tokens.
--compile adds the compiled decode step (server.bench.compiled): its startup, and its figures beside the eager
step's, in turns.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Any

import torch

from model import LocalTransformer
from model.decoder import Decoder
from model.threads import THREADS_HELP, configure_threads
from server.bench.compiled import CompiledPair, compile_summary, compiled_figures
from server.bench.decode_reference import comparisons
from server.bench.machine import finish_machine_state, machine_state
from server.bench.roofline import compute_roofline, memory_roofline
from server.bench.timing import (
    BENCH_MODEL,
    DTYPES,
    add_device_arguments,
    batched_step,
    device_state,
    finish_device_state,
    median_seconds_in_turns,
    on_device,
    one_token_step,
    random_tokens,
    resolve_device,
    synchronize,
)

# --steps, --rounds, --long-tokens and --reference-tokens when not given: (default, with --quick). Quick is meant
# to take contexts 512 / 8k / 64k and batches 1 to 256 on a GPU in a couple of minutes; the 100,000 tokens of the
# memory figure alone would take several.
SETTINGS = {"steps": (128, 48), "rounds": (8, 4), "long_tokens": (100_000, 2_000), "reference_tokens": (32, 8)}


def resident_bytes() -> int:
    """Resident set size of this process now (Linux), or the peak elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def memory_in_use(device: torch.device) -> tuple[str, int]:
    """What memory the figure is about and its bytes now: the resident set on a CPU, the tensors allocated on
    the GPU on CUDA (the process's resident set says nothing of the GPU's memory)."""
    gc.collect()
    if device.type == "cuda":
        synchronize()
        return "device_allocated", torch.cuda.memory_allocated(device)
    return "rss", resident_bytes()


def memory_over_long_generation(model: LocalTransformer, tokens: int) -> dict[str, float]:
    """Memory in use (resident, or the GPU's on CUDA) before and after generating `tokens` greedy tokens in one
    slot."""
    decoder = Decoder(model, num_slots=1)
    device = decoder.cache.lengths.device
    logits = decoder.prefill(0, random_tokens(1000))
    kind, before = memory_in_use(device)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = decoder.decode_all(logits.argmax(dim=-1, keepdim=True))[0]
    synchronize()
    seconds = time.perf_counter() - start
    _, after = memory_in_use(device)
    return {
        "generated_tokens": tokens,
        f"{kind}_before_mib": before / 2**20,
        f"{kind}_after_mib": after / 2**20,
        "growth_fraction": (after - before) / before,
        "ms_per_token": seconds / tokens * 1000,
    }


def speed_figures(model: LocalTransformer, args: argparse.Namespace) -> dict[str, Any]:
    """Decode step times by context and throughput by batch size, with their headline ratios."""
    per_token = decode_ms_per_token(model, args.contexts, args.steps, args.rounds)
    largest, smallest = str(max(args.contexts)), str(min(args.contexts))
    report: dict[str, Any] = {"decode_ms_per_token": per_token}
    report["context_ratio_largest_to_smallest"] = per_token[largest] / per_token[smallest]
    throughput = batched_tokens_per_second_in_turns(model, args.batches, args.steps, args.rounds)
    report["batched_tokens_per_second"] = throughput
    for batch in ("32", "256"):
        if "1" in throughput and batch in throughput:
            report[f"batch_{batch}_over_batch_1"] = throughput[batch] / throughput["1"]
    return report


def fill_in_settings(args: argparse.Namespace) -> None:
    """The settings left unset take their default, or their --quick value."""
    for name, (default, quick) in SETTINGS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)


def run_decode_bench(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    fill_in_settings(args)
    configure_threads(args.threads)
    torch.manual_seed(0)
    model_kwargs = dict(BENCH_MODEL, max_seq_len=max(args.contexts) + 1024)
    model = on_device(LocalTransformer(**model_kwargs), device, dtype)
    report: dict[str, Any] = {"machine": machine_state(), "device": device_state(device, dtype)}
    report.update(model=dict(model_kwargs), quick=args.quick, steps=args.steps, rounds=args.rounds)
    decoder = Decoder(model, num_slots=1)
    capacity, kv_bytes = decoder.cache.capacity, decoder.cache.nbytes()
    report["model"]["kv_cache_positions_per_layer"] = capacity
    report["model"]["kv_cache_bytes_per_slot"] = kv_bytes

    report.update(speed_figures(model, args))
    throughput = report["batched_tokens_per_second"]
    report["roofline"] = compute_roofline(model, capacity, throughput)
    report["memory_roofline"] = memory_roofline(model, kv_bytes, throughput)
    pair = CompiledPair(model, max(args.batches)) if args.compile else None
    if pair is not None:
        report["compiled_decode"] = compiled_figures(pair, capacity, args)
    report.update(comparisons(model, model_kwargs, throughput, args, pair.step_at if pair else None))
    if pair is not None:
        report["compile"] = compile_summary(report["compiled_decode"], report.get("reference"))
    del decoder, pair
    if args.long_tokens:
        streaming = on_device(LocalTransformer(**dict(model_kwargs, use_abs_pos_emb=False)), device, dtype)
        report["memory"] = memory_over_long_generation(streaming, args.long_tokens)

    finish_device_state(report["device"], device)
    finish_machine_state(report["machine"])
    return report


def add_decode_bench_arguments(parser: argparse.ArgumentParser) -> None:
    def numbers(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part]

    parser.add_argument("--contexts", type=numbers, default=[512, 8192, 65536])
    parser.add_argument("--batches", type=numbers, default=[1, 8, 32, 64])
    add_device_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="fewer steps, rounds and tokens where not given")
    parser.add_argument("--steps", type=int, help="timed decode steps per figure (default 128, quick 48)")
    parser.add_argument("--long-tokens", type=int, help="tokens for the memory figure (0: skip; 100000, quick 2000)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True, help="CPU only")
    parser.add_argument("--reference-tokens", type=int, help="timed reference tokens per context (32, quick 8)")
    parser.add_argument("--rounds", type=int, help="turns taken by the figures timed in turns (8, quick 4)")
    parser.add_argument("--uncached-up-to", type=int, default=8192, help="largest context for uncached figures")
    parser.add_argument("--mistral", action=argparse.BooleanOptionalAction, default=True, help="CPU only")
    parser.add_argument(
        "--compile", action="store_true", help="also time the compiled decode step against the eager one, in turns"
    )
