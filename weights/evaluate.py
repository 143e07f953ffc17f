"""Held-out loss in bits per byte: the whole text for the recorded figure, fixed windows for the training curve.

Bits per byte = the summed next-byte cross entropy in nats / ln 2 / the number of predicted bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from model import LocalTransformer
from weights.byte_inputs import autocast, bytes_tensor


def summed_nats(model: LocalTransformer, tokens: Tensor, bf16: bool = False) -> float:
    """Summed cross entropy (nats) of predicting tokens[:, 1:] from tokens[:, :-1]; tokens (b, n + 1)."""
    with autocast(bf16):
        logits = model(tokens[:, :-1])  # (b, n, 256)
    return F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="sum").item()


@torch.no_grad()
def evaluate_bits_per_byte(
    model: LocalTransformer, data: bytes, seq_len: int, *, batch_size: int = 8, bf16: bool = False
) -> float:
    """Bits per byte of `data` over non-overlapping windows of seq_len predicted bytes.

    Window k reads data[k*L : (k+1)*L] and predicts data[k*L+1 : (k+1)*L+1], so every byte after the first
    is predicted exactly once, and a window's first predictions see only the bytes of that window (a
    longer seq_len costs nothing extra and leaves fewer such cold starts). The result does not depend on
    any random state; full windows run batch_size at a time, the shorter last window alone.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be at least 1, got {seq_len} and {batch_size}")
    if len(data) < 2:
        raise ValueError(f"need at least two bytes to predict one, got {len(data)}")
    tokens = bytes_tensor(data).long()  # (n,)
    predicted = len(data) - 1
    full = predicted // seq_len
    starts = torch.arange(full) * seq_len  # (full,)
    offsets = torch.arange(seq_len + 1)  # (L + 1,)
    was_training = model.training
    model.eval()
    try:
        nats = 0.0
        for first in range(0, full, batch_size):
            windows = tokens[starts[first : first + batch_size, None] + offsets]  # (b, L + 1)
            nats += summed_nats(model, windows, bf16)
        if predicted % seq_len:
            nats += summed_nats(model, tokens[None, full * seq_len :], bf16)
    finally:
        model.train(was_training)
    return nats / math.log(2) / predicted


def fixed_windows(data: bytes, count: int, length: int) -> Tensor:
    """`count` windows of `length` bytes spread evenly over data -> (count, length) long, the same every call."""
    if len(data) < length:
        raise ValueError(f"the text has {len(data)} bytes, fewer than one window of {length}")
    starts = torch.linspace(0, len(data) - length, count).round().long()  # (count,)
    return bytes_tensor(data).long()[starts[:, None] + torch.arange(length)]  # (count, length)


@torch.no_grad()
def windows_bits_per_byte(model: LocalTransformer, windows: Tensor, batch_size: int, bf16: bool = False) -> float:
    """Bits per byte over fixed windows (N, L + 1), each predicting its last L bytes: the quick estimate."""
    was_training = model.training
    model.eval()
    try:
        nats = sum(summed_nats(model, batch, bf16) for batch in windows.split(batch_size))
    finally:
        model.train(was_training)
    return nats / math.log(2) / (windows.shape[0] * (windows.shape[1] - 1))
