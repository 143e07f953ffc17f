"""`windowlm bench decode`: decode speed and memory of the sliding cache, against the reference, as JSON.

Every figure comes from one run on one machine with the same weights, so ratios between them are meaningful
even where the machine is noisy. The model is timing.BENCH_MODEL: local-attention's train.py model scaled down.
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
from server.bench.decode_reference import comparisons
from server.bench.machine import finish_machine_state, machine_state
from server.bench.roofline import compute_roofline, memory_roofline
from server.bench.timing import BENCH_MODEL, batched_step, median_seconds_in_turns, one_token_step, random_tokens


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


def speed_figures(model: LocalTransformer, args: argparse.Namespace) -> dict[str, Any]:
    """Decode step times by context and throughput by batch size, with their headline ratios."""
    per_token = decode_ms_per_token(model, args.contexts, args.steps, args.rounds)
    largest, smallest = str(max(args.contexts)), str(min(args.contexts))
    report: dict[str, Any] = {"decode_ms_per_token": per_token}
    report["context_ratio_largest_to_smallest"] = per_token[largest] / per_token[smallest]
    throughput = batched_tokens_per_second_in_turns(model, args.batches, args.steps, args.rounds)
    report["batched_tokens_per_second"] = throughput
    if "1" in throughput and "32" in throughput:
        report["batch_32_over_batch_1"] = throughput["32"] / throughput["1"]
    return report


def run_decode_bench(args: argparse.Namespace) -> dict[str, Any]:
    configure_threads(args.threads)
    torch.manual_seed(0)
    model_kwargs = dict(BENCH_MODEL, max_seq_len=max(args.contexts) + 1024)
    model = LocalTransformer(**model_kwargs).eval()
    report: dict[str, Any] = {"machine": machine_state(), "model": dict(model_kwargs)}
    decoder = Decoder(model, num_slots=1)
    capacity, kv_bytes = decoder.cache.capacity, decoder.cache.nbytes()
    report["model"]["kv_cache_positions_per_layer"] = capacity
    report["model"]["kv_cache_bytes_per_slot"] = kv_bytes

    report.update(speed_figures(model, args))
    throughput = report["batched_tokens_per_second"]
    report["roofline"] = compute_roofline(model, capacity, throughput)
    report["memory_roofline"] = memory_roofline(model, kv_bytes, throughput)
    report.update(comparisons(model, model_kwargs, throughput, args))
    if args.long_tokens:
        streaming = LocalTransformer(**dict(model_kwargs, use_abs_pos_emb=False)).eval()
        report["memory"] = memory_over_long_generation(streaming, args.long_tokens)

    finish_machine_state(report["machine"])
    return report


def add_decode_bench_arguments(parser: argparse.ArgumentParser) -> None:
    def numbers(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part]

    parser.add_argument("--contexts", type=numbers, default=[512, 8192, 65536])
    parser.add_argument("--batches", type=numbers, default=[1, 8, 32, 64])
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps per figure")
    parser.add_argument("--long-tokens", type=int, default=100_000, help="tokens for the memory figure (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--reference-tokens", type=int, default=32, help="timed reference tokens per context")
    parser.add_argument("--rounds", type=int, default=8, help="turns taken by the figures timed in turns")
    parser.add_argument("--uncached-up-to", type=int, default=8192, help="largest context for uncached figures")
    parser.add_argument("--mistral", action=argparse.BooleanOptionalAction, default=True)
