"""`windowlm bench decode`'s comparisons: local-attention's own generate loop on the same weights, and
HuggingFace transformers' MistralForCausalLM of the same size with its sliding-window cache.

Both run on the CPU: on CUDA they are skipped, with the reason in the report (the GPU run is for our own
figures, in the few minutes it has). Mistral runs in the bench's dtype, local-attention in float32 only (its
position-bias MLP takes float32 inputs whatever its weights' dtype)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

from model import LocalTransformer
from server.bench.timing import median_seconds_in_turns, one_token_step, random_tokens, timed

ON_CUDA = "the comparisons run on the CPU only, not on cuda"
NOT_FLOAT32 = "local-attention's model runs in float32 only"


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


# a decode step of one slot after `context` tokens, ready to time (see compiled.CompiledPair.step_at)
StepAt = Callable[[int], Callable[[], Any]]


def paired_ms_per_token(
    model: LocalTransformer,
    reference: torch.nn.Module,
    context: int,
    steps: int,
    reference_steps: int,
    rounds: int,
    compiled_step: StepAt | None = None,
) -> dict[str, float]:
    """Median milliseconds per token of our decode step ("ours"), the reference's cached generate loop
    ("reference") and, given `compiled_step`, our compiled step ("compiled") at `context`, timed in turns."""
    loop = ReferenceLoop(reference, context, use_kv_cache=True)
    runs = {"ours": (one_token_step(model, context), steps), "reference": (loop.step, reference_steps)}
    if compiled_step is not None:
        runs["compiled"] = (compiled_step(context), steps)
    return {name: seconds * 1000 for name, seconds in median_seconds_in_turns(runs, rounds).items()}


def reference_figures(
    model: LocalTransformer, model_kwargs: dict, args: argparse.Namespace, compiled_step: StepAt | None = None
) -> dict[str, Any]:
    """local-attention's own generate loop on the same weights: cached (timed in turns with ours, and with our
    compiled step where there is one) and uncached."""
    try:
        import local_attention
    except ImportError:
        return {"skipped": "local-attention is not installed (pip install 'windowlm[dev]')"}
    if next(model.parameters()).dtype != torch.float32:
        return {"skipped": NOT_FLOAT32}
    reference = local_attention.LocalTransformer(**model_kwargs).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    cached, ours, compiled, uncached = {}, {}, {}, {}
    for context in args.contexts:
        paired = paired_ms_per_token(
            model, reference, context, args.steps, args.reference_tokens, args.rounds, compiled_step
        )
        ours[str(context)], cached[str(context)] = paired["ours"], paired["reference"]
        if "compiled" in paired:
            compiled[str(context)] = paired["compiled"]
        if context <= args.uncached_up_to:
            loop = ReferenceLoop(reference, context, use_kv_cache=False)
            uncached[str(context)] = statistics.median(timed(loop.step, 2)) * 1000
    figures = {
        "cached_ms_per_token": cached,
        "ours_ms_per_token_in_turns": ours,
        "cached_over_ours": {context: cached[context] / ours[context] for context in cached},
        "uncached_ms_per_token": uncached,
    }
    if compiled:
        figures["compiled_ms_per_token_in_turns"] = compiled
        figures["cached_over_compiled"] = {context: cached[context] / compiled[context] for context in compiled}
    return figures


def mistral_model(model_kwargs: dict, max_positions: int) -> torch.nn.Module | None:
    """A MistralForCausalLM shaped like the bench model (random weights), or None without transformers."""
    try:
        from transformers import MistralConfig, MistralForCausalLM
    except ImportError:
        return None
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
        max_position_embeddings=max_positions,
        attn_implementation="sdpa",
    )
    return MistralForCausalLM(config).eval()


@torch.no_grad()
def mistral_step_seconds(mistral: torch.nn.Module, batch: int, context: int, steps: int) -> float:
    """Median seconds of one cached decode step of `batch` sequences after a prompt of `context` tokens."""
    out = mistral(torch.randint(0, 256, (batch, context)), use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step() -> None:
        nonlocal past, token
        result = mistral(token, past_key_values=past, use_cache=True)
        past, token = result.past_key_values, result.logits[:, -1:].argmax(-1)

    for _ in range(3):
        step()
    return statistics.median(timed(step, steps))


def mistral_figures(
    model_kwargs: dict, context: int, batches: list[int], steps: int, dtype: torch.dtype
) -> dict[str, Any]:
    """HuggingFace transformers' MistralForCausalLM of the same size with its sliding-window cache."""
    mistral = mistral_model(model_kwargs, context + steps + 64)
    if mistral is None:
        return {"skipped": "transformers is not installed (pip install 'windowlm[bench]')"}
    mistral = mistral.to(dtype)
    figures: dict[str, Any] = {"transformers_context": context}
    for batch in batches:
        seconds = mistral_step_seconds(mistral, batch, context, steps)
        figures[f"batch_{batch}"] = {"ms_per_step": seconds * 1000, "tokens_per_second": batch / seconds}
    return figures


def comparisons(
    model: LocalTransformer,
    model_kwargs: dict,
    throughput: dict[str, float],
    args: argparse.Namespace,
    compiled_step: StepAt | None = None,
) -> dict[str, Any]:
    """The report's entries for the comparisons asked for (--reference, --mistral), with their ratios; with
    `compiled_step` (--compile) the reference is timed in turns with our compiled step too."""
    report: dict[str, Any] = {}
    parameter = next(model.parameters())
    if parameter.device.type != "cpu":
        report.update({name: {"skipped": ON_CUDA} for name, on in comparisons_asked(args).items() if on})
        return report
    if args.reference:
        report["reference"] = reference_figures(model, model_kwargs, args, compiled_step)
        speedup_8k = report["reference"].get("cached_over_ours", {}).get("8192")
        if speedup_8k:
            report["speedup_over_reference_cached_at_8k"] = speedup_8k
    if args.mistral:
        batches = [b for b in (1, 32) if str(b) in throughput]
        mistral = mistral_figures(model_kwargs, 512, batches, args.steps, parameter.dtype)
        report["transformers_mistral"] = mistral
        for batch in ("1", "32"):
            theirs = mistral.get(f"batch_{batch}", {}).get("tokens_per_second")
            if theirs:
                report[f"over_mistral_batch_{batch}"] = throughput[batch] / theirs
    return report


def comparisons_asked(args: argparse.Namespace) -> dict[str, bool]:
    """The report's key of each comparison and whether it was asked for."""
    return {"reference": args.reference, "transformers_mistral": args.mistral}
