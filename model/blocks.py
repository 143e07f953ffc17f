"""The per-token arithmetic of the transformer's blocks, as plain functions of plain weight records.

The modules (LocalMHA, FeedForward) hold the parameters and the state-dict layout; their forward passes run
these functions on a record of their own tensors. The cached step builds the records once and runs the same
functions without calling a module: per decoded token that saves dozens of module calls, which on a CPU
cost as much as the arithmetic itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model.positions import l2norm


@dataclass(frozen=True, slots=True)
class NormWeights:
    """A LayerNorm's parameters."""

    shape: tuple[int, ...]
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    @classmethod
    def of(cls, norm: nn.LayerNorm) -> NormWeights:
        return cls(tuple(norm.normalized_shape), norm.weight, norm.bias, norm.eps)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


@dataclass(frozen=True, slots=True)
class AttentionWeights:
    """One LocalMHA's projections: input norm, fused qkv, optional qk RMS norm and value gates, output."""

    heads: int
    dim_head: int
    norm: NormWeights | None
    to_qkv: Tensor  # (3 * heads * dim_head, dim)
    q_scale: Tensor | None  # (dim_head,), with qk_rmsnorm
    k_scale: Tensor | None
    value_gate: tuple[Tensor, Tensor] | None  # weight (heads, dim), bias (heads,)
    to_out: Tensor  # (dim, heads * dim_head)


def attention_inputs(weights: AttentionWeights, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Input (b, n, dim) -> normed input (b, n, dim) and q, k, v (b, h, n, dh)."""
    if weights.norm is not None:
        x = weights.norm(x)
    batch, length, _ = x.shape
    qkv = F.linear(x, weights.to_qkv).view(batch, length, 3, weights.heads, weights.dim_head)  # (b, n, 3, h, dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, n, dh), views
    if weights.q_scale is not None:
        q = l2norm(q) * weights.q_scale
        k = l2norm(k) * weights.k_scale
    return x, q, k, v


def attention_output(weights: AttentionWeights, x: Tensor, attended: Tensor) -> Tensor:
    """Normed input (b, n, dim) and attention output (b, h, n, dh) -> (b, n, dim)."""
    if weights.value_gate is not None:
        gates = rearrange(F.linear(x, *weights.value_gate), "b n h -> b h n 1")
        attended = attended * gates.sigmoid()
    batch, _, length, _ = attended.shape
    return F.linear(attended.transpose(1, 2).reshape(batch, length, -1), weights.to_out)  # (b, n, dim)


@dataclass(frozen=True, slots=True)
class FeedForwardWeights:
    """A pre-norm GEGLU feed-forward: norm, input projection to 2 x inner, output projection from inner."""

    norm: NormWeights
    project_in: Tensor  # (2 * inner, dim)
    project_out: Tensor  # (dim, inner)
    dropout: float


def geglu(x: Tensor) -> Tensor:
    """(..., 2 * inner) -> (..., inner): the first half gated by the GELU of the second."""
    half = x.shape[-1] // 2
    return x[..., :half] * F.gelu(x[..., half:])


def feed_forward(weights: FeedForwardWeights, x: Tensor, training: bool = False) -> Tensor:
    """x (b, n, dim) -> (b, n, dim)."""
    hidden = geglu(F.linear(weights.norm(x), weights.project_in))  # (b, n, inner)
    if training and weights.dropout > 0:
        hidden = F.dropout(hidden, weights.dropout, training=True)
    return F.linear(hidden, weights.project_out)


def project_logits(norm: NormWeights, unembed: Tensor, hidden: Tensor) -> Tensor:
    """Final hidden states (b, n, dim) -> logits (b, n, num_tokens): the last norm, then the unembedding."""
    return F.linear(norm(hidden), unembed)
