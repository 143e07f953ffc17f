"""`windowlm bench decode --compile` on a tiny model: the report gains the compiled figures, each positive, and
the `compile` block sets each against its target."""

from __future__ import annotations

import argparse

import pytest

from server.bench import decode
from server.bench.decode import add_decode_bench_arguments, run_decode_bench
from server.bench.timing import BENCH_MODEL

TINY_MODEL = dict(BENCH_MODEL, dim=32, depth=1, heads=2, dim_head=16, local_attn_window_size=16)


def positive(figures: dict) -> bool:
    return all(value > 0 for value in figures.values())


@pytest.mark.slow
def test_bench_decode_compile_reports_eager_and_compiled_in_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiles the decode step (two graphs: batch 1 and both slots), tens of seconds on a small CPU."""
    pytest.importorskip("local_attention")
    monkeypatch.setattr(decode, "BENCH_MODEL", TINY_MODEL)
    parser = argparse.ArgumentParser()
    add_decode_bench_arguments(parser)
    flags = "--quick --steps 4 --rounds 1 --reference-tokens 2 --contexts 64,8192 --batches 1,2 --long-tokens 0"
    args = parser.parse_args([*flags.split(), "--uncached-up-to", "0", "--no-mistral", "--compile"])
    report = run_decode_bench(args)

    compiled = report["compiled_decode"]
    assert compiled["slots"] == 2
    assert len(compiled["startup_progress"]) == 2
    assert compiled["logits_max_abs_difference"] < 1e-3
    for kind in ("eager", "compiled", "compiled_over_eager"):
        assert set(compiled["batched_tokens_per_second"][kind]) == {"1", "2"}
        assert positive(compiled["batched_tokens_per_second"][kind])
    for kind in ("eager", "compiled", "eager_over_compiled"):
        assert set(compiled["decode_ms_per_token"][kind]) == {"64", "8192"}
        assert positive(compiled["decode_ms_per_token"][kind])
    by_batch = compiled["roofline"]["by_batch"]
    assert set(by_batch) == {"1", "2"}
    assert all(by_batch[batch][kind]["fraction"] > 0 for batch in by_batch for kind in ("eager", "compiled"))
    assert positive(report["reference"]["cached_over_compiled"])

    summary = report["compile"]
    assert summary["startup_seconds"] == compiled["startup_seconds"] > 0
    assert summary["startup_progress"] == compiled["startup_progress"]
    for name in ("batch_1_speedup", "roofline_fraction_batch_1", "reference_cached_over_compiled_at_8k", "startup"):
        assert summary[name]["value"] > 0 and isinstance(summary[name]["met"], bool), name
    assert summary["roofline_fraction_batch_1"]["eager"] > 0
    assert summary["roofline_fraction_batch_1"]["target_at_least"] == 0.4
    assert summary["startup"]["target_below"] == 60
    assert summary["roofline_fraction_batch_32"] == {"value": None, "target_at_least": 0.7, "met": None}
    assert summary["all_met"] in (False, None)  # batch 32 is not measured here


def test_bench_decode_reports_keep_their_shape_without_compile() -> None:
    """--compile is off by default: no compiled figures unless asked for."""
    parser = argparse.ArgumentParser()
    add_decode_bench_arguments(parser)
    assert parser.parse_args([]).compile is False
