"""The transformer's blocks: the LocalMHA and FeedForward modules, and their per-token arithmetic as plain
functions of plain weight records.

The modules hold the parameters and the state-dict layout; their forward passes run these functions on a
record of their own tensors. The cached step builds the records once and runs the same
functions without calling a module: per decoded token that saves dozens of module calls, which on a CPU
cost as much as the arithmetic itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model.attention import LocalAttention
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


class LocalMHA(nn.Module):
    """Multi-head local attention: projections, optional qk RMS norm and per-head value gates.

    Extra keyword arguments (look_backward, look_forward, shared_qk, use_rotary_pos_emb, ...) go to
    LocalAttention. The projections are called as functions of their weights (attention_inputs, attention_output),
    not as modules: hooks on them or modules swapped in for them are not run.
    """

    def __init__(
        self,
        *,
        dim: int,
        window_size: int,
        dim_head: int = 64,
        heads: int = 8,
        dropout: float = 0.0,
        causal: bool = False,
        prenorm: bool = False,
        qk_rmsnorm: bool = False,
        qk_scale: float = 8,
        use_xpos: bool = False,
        xpos_scale_base: float | None = None,
        exact_windowsize: bool | None = None,
        gate_values_per_head: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.causal = causal
        self.window_size = window_size
        self.exact_windowsize = True if exact_windowsize is None else exact_windowsize
        self.qk_rmsnorm = qk_rmsnorm

        self.norm = nn.LayerNorm(dim) if prenorm else None
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        if qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(dim_head))
            self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.attn_fn = LocalAttention(
            dim=dim_head,
            window_size=window_size,
            causal=causal,
            autopad=True,
            scale=qk_scale if qk_rmsnorm else None,
            exact_windowsize=self.exact_windowsize,
            use_xpos=use_xpos,
            xpos_scale_base=xpos_scale_base,
            dropout=dropout,
            **kwargs,
        )
        self.to_v_gate = nn.Sequential(nn.Linear(dim, heads)) if gate_values_per_head else None
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def weights(self) -> AttentionWeights:
        gate = None if self.to_v_gate is None else (self.to_v_gate[0].weight, self.to_v_gate[0].bias)
        return AttentionWeights(
            heads=self.heads,
            dim_head=self.dim_head,
            norm=None if self.norm is None else NormWeights.of(self.norm),
            to_qkv=self.to_qkv.weight,
            q_scale=self.q_scale if self.qk_rmsnorm else None,
            k_scale=self.k_scale if self.qk_rmsnorm else None,
            value_gate=gate,
            to_out=self.to_out.weight,
        )

    def forward(self, x: Tensor, mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """x (b, n, dim), mask (b, n) of positions to keep, attn_bias (h, W, frame) -> (b, n, dim)."""
        weights = self.weights()
        x, q, k, v = attention_inputs(weights, x)
        return attention_output(weights, x, self.attn_fn(q, k, v, mask=mask, attn_bias=attn_bias))


class GEGLU(nn.Module):
    """FeedForward's activation, kept as a module so the layer indices of the state dict stay 0, 1, 4."""

    def forward(self, x: Tensor) -> Tensor:
        return geglu(x)


class FeedForward(nn.Sequential):
    """Pre-norm GEGLU feed-forward; the layer indices (0, 1, 4) match the reference's state dict.

    Its forward is feed_forward of the children's weights; the children are not called.
    """

    def __init__(self, dim: int, mult: float = 4, dropout: float = 0.0) -> None:
        inner_dim = int(dim * mult * 2 / 3)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner_dim * 2, bias=False),
            GEGLU(),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim, bias=False),
        )

    def weights(self) -> FeedForwardWeights:
        norm, project_in, _, dropout, project_out = self
        return FeedForwardWeights(NormWeights.of(norm), project_in.weight, project_out.weight, dropout.p)

    def forward(self, x: Tensor) -> Tensor:
        """x (b, n, dim) -> (b, n, dim)."""
        return feed_forward(self.weights(), x, self.training)
