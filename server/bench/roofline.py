"""How close the decode step comes to the machine's limits: the FLOP/s of plain matmuls of its own shapes, and
streaming reads of the bytes a step must read at least (the weights once, every slot's whole cache); on the
model's own device and, for the matmuls, in its dtype."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from model import LocalTransformer
from server.bench.timing import timed


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
    like = dict(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    inputs = [torch.randn(batch, n_in, **like) for n_in, _ in shapes]
    weights = [torch.randn(n_out, n_in, **like) for n_in, n_out in shapes]

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


def read_bandwidth(total_bytes: int, device: torch.device, repeats: int = 20) -> float:
    """Bytes/s of streaming reads over a working set of `total_bytes` (a sum over four tensors) on `device`: the
    memory roofline of a step that reads that much."""
    chunks = [torch.ones(max(1, total_bytes // 16), device=device) for _ in range(4)]  # four float32 tensors

    def run() -> None:
        for chunk in chunks:
            chunk.sum()

    run()
    return sum(chunk.nbytes for chunk in chunks) / statistics.median(timed(run, repeats))


def compute_roofline(model: LocalTransformer, capacity: int, throughput: dict[str, float]) -> dict[str, Any]:
    """The decode step's FLOP/s at batch 1, 32 and 256 (those measured) against plain matmuls of its shapes."""
    flops_per_token = decode_flops_per_token(model, capacity)
    by_batch = {}
    for batch in (1, 32, 256):
        if str(batch) in throughput:
            achieved = flops_per_token * throughput[str(batch)]
            peak = matmul_roofline_flops(model, batch)
            by_batch[str(batch)] = {
                "decode_gflops": achieved / 1e9,
                "matmul_gflops": peak / 1e9,
                "fraction": achieved / peak,
            }
    return {"decode_flops_per_token": flops_per_token, "by_batch": by_batch}


def memory_roofline(model: LocalTransformer, kv_bytes_per_slot: int, throughput: dict[str, float]) -> dict[str, Any]:
    """The bytes/s the decode step reads at each measured batch size against streaming reads of as many bytes."""
    memory, device = {}, next(model.parameters()).device
    for batch, tokens_per_second in throughput.items():
        step_bytes = decode_bytes_per_step(model, kv_bytes_per_slot, int(batch))
        achieved, peak = step_bytes * tokens_per_second / int(batch), read_bandwidth(step_bytes, device)
        memory[batch] = {
            "bytes_per_step": step_bytes,
            "decode_gb_per_second": achieved / 1e9,
            "read_gb_per_second": peak / 1e9,
            "fraction": achieved / peak,
        }
    return memory


def roofline_fractions(
    model: LocalTransformer, capacity: int, throughputs: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """compute_roofline for several ways of running the step (eager, compiled: tokens/s by batch size, the same
    sizes for each), at every measured batch size, against one plain-matmul figure per size."""
    flops_per_token = decode_flops_per_token(model, capacity)
    batches = next(iter(throughputs.values()), {})
    by_batch: dict[str, Any] = {}
    for batch in batches:
        peak = matmul_roofline_flops(model, int(batch))
        entry: dict[str, Any] = {"matmul_gflops": peak / 1e9}
        for kind, throughput in throughputs.items():
            achieved = flops_per_token * throughput[batch]
            entry[kind] = {"decode_gflops": achieved / 1e9, "fraction": achieved / peak}
        by_batch[batch] = entry
    return {"decode_flops_per_token": flops_per_token, "by_batch": by_batch}
