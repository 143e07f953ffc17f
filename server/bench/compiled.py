"""`windowlm bench decode --compile`: the compiled decode step (model.compiled_step) against the eager one.

One Decoder of as many slots as the largest batch is compiled, as the server compiles its own at startup, and an
eager twin holds the same cache buffer for buffer; every figure times the two in turns, so their ratio holds on
a noisy machine. The contexts reuse the compiled decoder's batch-1 graph: each context's prefilled slot is
copied into slot 0 of both decoders (same shapes), so no context compiles anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from model import LocalTransformer
from model.cache import SlidingKVCache
from model.decoder import Decoder
from server.bench.roofline import roofline_fractions
from server.bench.timing import filled_decoder, median_seconds_in_turns, prefilled_decoder

KINDS = ("eager", "compiled")

# The targets on the project's CPU: each figure must reach its goal, but the startup must stay below its own
TARGETS = {
    "batch_1_speedup": 1.8,
    "roofline_fraction_batch_1": 0.4,
    "roofline_fraction_batch_32": 0.7,
    "reference_cached_over_compiled_at_8k": 5.0,
    "startup_seconds": 60.0,
}


def copy_cache(target: SlidingKVCache, source: SlidingKVCache, slot: int | None = None) -> None:
    """Make `target` hold what `source` holds: every slot, or slot `slot` of `target` what slot 0 of `source`
    holds. In place: a compiled step keeps the buffers it was compiled with."""
    with torch.no_grad():
        if slot is None:
            pairs = [(target.key_rows, source.key_rows), (target.value_rows, source.value_rows)]
            pairs += [(target.lengths, source.lengths), (target.starts, source.starts)]
        else:
            pairs = [(target.keys[:, slot], source.keys[:, 0]), (target.values[:, slot], source.values[:, 0])]
            pairs += [(target.lengths[slot : slot + 1], source.lengths[:1])]
            pairs += [(target.starts[slot : slot + 1], source.starts[:1])]
        for into, values in pairs:
            into.copy_(values)


class CompiledPair:
    """A Decoder running the compiled step and an eager twin holding the same cache, slot for slot."""

    def __init__(self, model: LocalTransformer, slots: int) -> None:
        self.model = model
        self.compiled, self.tokens = filled_decoder(model, slots)  # tokens (slots,)
        self.eager = Decoder(model, num_slots=slots)
        copy_cache(self.eager.cache, self.compiled.cache)
        self.progress: list[str] = []

    def compile(self) -> float:
        """Compile the step for every batch size (its progress to stderr, and kept) -> seconds, the server's
        startup cost for a decoder of this many slots."""

        def report(line: str) -> None:
            self.progress.append(line)
            print(line, file=sys.stderr, flush=True)

        return self.compiled.compile(progress=report)

    def step(self, kind: str, batch: int) -> Callable[[], Any]:
        """A decode step of slots 0..batch-1 of the eager or compiled decoder: each call decodes one more token."""
        decoder = self.compiled if kind == "compiled" else self.eager
        slots, tokens = slice(0, batch), self.tokens[:batch]
        return lambda: decoder.decode(slots, tokens)

    def load_context(self, context: int) -> None:
        """Slot 0 of both decoders holding `context` random tokens (the same tokens as timing.one_token_step)."""
        source = prefilled_decoder(self.model, context).cache
        copy_cache(self.compiled.cache, source, slot=0)
        copy_cache(self.eager.cache, source, slot=0)

    def step_at(self, context: int) -> Callable[[], Any]:
        """The compiled batch-1 step after `context` tokens (slot 0 reloaded: one context at a time)."""
        self.load_context(context)
        return self.step("compiled", 1)

    def logits_difference(self) -> float:
        """Largest difference between the two decoders' logits for one step of every slot (both advance)."""
        every = len(self.tokens)
        eager, compiled = (self.step(kind, every)() for kind in KINDS)
        return float((eager - compiled).abs().max())


def batch_figures(pair: CompiledPair, batches: list[int], steps: int, rounds: int) -> dict[str, Any]:
    """Tokens/s of slots 0..B-1 for each B, eager and compiled, all timed in turns, and compiled / eager."""
    runs = {(kind, batch): (pair.step(kind, batch), steps) for batch in batches for kind in KINDS}
    seconds = median_seconds_in_turns(runs, rounds)
    figures: dict[str, Any] = {kind: {str(b): b / seconds[kind, b] for b in batches} for kind in KINDS}
    figures["compiled_over_eager"] = {b: figures["compiled"][b] / figures["eager"][b] for b in figures["eager"]}
    return figures


def context_figures(pair: CompiledPair, contexts: list[int], steps: int, rounds: int) -> dict[str, Any]:
    """Milliseconds of a batch-1 step with each context in the slot, eager and compiled in turns, one context
    after another (slot 0 is reloaded for each), and eager / compiled."""
    figures: dict[str, Any] = {kind: {} for kind in KINDS}
    for context in contexts:
        pair.load_context(context)
        seconds = median_seconds_in_turns({kind: (pair.step(kind, 1), steps) for kind in KINDS}, rounds)
        for kind in KINDS:
            figures[kind][str(context)] = seconds[kind] * 1000
    figures["eager_over_compiled"] = {c: figures["eager"][c] / figures["compiled"][c] for c in figures["eager"]}
    return figures


def compiled_figures(pair: CompiledPair, capacity: int, args: argparse.Namespace) -> dict[str, Any]:
    """Compile the pair's decoder, then time it against its eager twin: by batch size, with the roofline
    fraction of each, and by context at batch 1."""
    figures: dict[str, Any] = {"slots": len(pair.tokens), "startup_seconds": pair.compile()}
    figures["startup_progress"] = pair.progress
    figures["logits_max_abs_difference"] = pair.logits_difference()
    throughput = batch_figures(pair, args.batches, args.steps, args.rounds)
    figures["batched_tokens_per_second"] = throughput
    figures["roofline"] = roofline_fractions(pair.model, capacity, {kind: throughput[kind] for kind in KINDS})
    figures["decode_ms_per_token"] = context_figures(pair, args.contexts, args.steps, args.rounds)
    return figures


def against_target(name: str, value: float | None, **beside: float) -> dict[str, Any]:
    """A figure next to its target and whether it meets it (None where the run did not measure it)."""
    goal = TARGETS[name]
    below = name == "startup_seconds"
    met = None if value is None else (value < goal if below else value >= goal)
    return {**beside, "value": value, "target_below" if below else "target_at_least": goal, "met": met}


def compile_summary(figures: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """The report's `compile` block: startup, and each of the issue's figures next to its target."""
    speedup = figures["batched_tokens_per_second"]["compiled_over_eager"].get("1")
    summary: dict[str, Any] = {"startup_seconds": figures["startup_seconds"]}
    summary["startup_progress"] = figures["startup_progress"]
    summary["batch_1_speedup"] = against_target("batch_1_speedup", speedup)
    for batch in ("1", "32"):
        fractions = figures["roofline"]["by_batch"].get(batch)
        name = f"roofline_fraction_batch_{batch}"
        if fractions is None:
            summary[name] = against_target(name, None)
        else:
            eager = fractions["eager"]["fraction"]
            summary[name] = against_target(name, fractions["compiled"]["fraction"], eager=eager)
    over_compiled = (reference or {}).get("cached_over_compiled", {}).get("8192")
    summary["reference_cached_over_compiled_at_8k"] = against_target(
        "reference_cached_over_compiled_at_8k", over_compiled
    )
    summary["startup"] = against_target("startup_seconds", figures["startup_seconds"])
    met = [entry["met"] for entry in summary.values() if isinstance(entry, dict)]
    summary["all_met"] = False if False in met else None if None in met else True  # None: some not measured
    return summary
