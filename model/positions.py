"""Relative position encodings of local attention: rotary (optionally xpos-scaled) and dynamic position bias.

Both are computed from small, window-relative positions: inside one attention frame of F = (lb + 1 + lf) * W
keys, a key has frame position p in [0, F) and a query of window slot i has frame position (lb + lf) * W + i.
Because the numbers never exceed F, the float32 angles are as precise at token 10,000,000 as at token 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

ROTARY_THETA = 10000


class ContextLimitError(ValueError):
    """A position past max_seq_len of a model with a learned absolute position embedding."""


def rotate_half(x: Tensor) -> Tensor:
    """Rotate the two halves of the last dimension: (a, b) -> (-b, a)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@dataclass
class Rotation:
    """Rotary cos and sin of some positions, and their xpos scale (or None), each (..., P, dim)."""

    cos: Tensor
    sin: Tensor
    scale: Tensor | None

    def apply(self, x: Tensor) -> Tensor:
        """Rotate x (..., P, dim), in float32 as the reference does, back to x's dtype."""
        x32 = x.float()
        if self.scale is None:
            return (x32 * self.cos + rotate_half(x32) * self.sin).to(x.dtype)
        return (x32 * self.cos * self.scale + rotate_half(x32) * self.sin * self.scale).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over frame positions, with the optional xpos length-extrapolation scale.

    The state dict holds `inv_freq` only, as local-attention's checkpoints do.
    """

    def __init__(self, dim: int, use_xpos: bool = False, scale_base: float | None = None) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary embedding dimension must be even, got {dim}")
        if use_xpos and scale_base is None:
            raise ValueError("xpos needs a scale base")
        inv_freq = 1.0 / (ROTARY_THETA ** (torch.arange(0, dim, 2).float() / dim))  # (dim/2,)
        self.register_buffer("inv_freq", inv_freq)
        self.use_xpos = use_xpos
        self.scale_base = scale_base
        xpos_base = (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim)  # (dim/2,)
        self.register_buffer("xpos_base", xpos_base, persistent=False)

    def angles(self, positions: Tensor) -> Tensor:
        """Rotation angles (..., dim) of float frame positions (...)."""
        freqs = positions.float()[..., None] * self.inv_freq  # (..., dim/2)
        return torch.cat((freqs, freqs), dim=-1)

    def xpos_scale(self, positions: Tensor, frame_len: int) -> Tensor:
        """xpos scale (..., dim) of frame positions; centred on the middle of a frame of `frame_len` keys."""
        power = (positions.float() - frame_len // 2) / self.scale_base  # (...)
        scale = self.xpos_base ** power[..., None]  # (..., dim/2)
        return torch.cat((scale, scale), dim=-1)

    def rotation(self, positions: Tensor, frame_len: int, inverse_scale: bool) -> Rotation:
        """The rotation of frame positions (...): queries take the xpos scale, keys its inverse."""
        angles = self.angles(positions)  # (..., dim)
        scale = None
        if self.use_xpos:
            scale = self.xpos_scale(positions, frame_len)  # (..., dim)
            scale = scale**-1 if inverse_scale else scale
        return Rotation(angles.cos(), angles.sin(), scale)

    def rotate(self, x: Tensor, positions: Tensor, frame_len: int, inverse_scale: bool) -> Tensor:
        """Rotate x (..., P, dim) at frame positions (P,)."""
        return self.rotation(positions, frame_len, inverse_scale).apply(x)

    def rotate_queries_and_keys(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate bucketed queries (..., W, d) and look-around keys (..., F, d) by their frame positions.

        Keys take positions 0..F-1 and queries the last W of them. With look_forward > 0 this places a query
        lf * W positions after its true offset to the keys, exactly as local-attention 1.11.2 does.
        """
        frame_len, window = k.shape[-2], q.shape[-2]
        key_positions = torch.arange(frame_len, device=k.device)  # (F,)
        query_positions = key_positions[frame_len - window :]  # (W,)
        return (
            self.rotate(q, query_positions, frame_len, inverse_scale=False),
            self.rotate(k, key_positions, frame_len, inverse_scale=True),
        )


class DynamicPositionBias(nn.Module):
    """A small MLP from relative distance to one attention bias per head (state dict keys `mlp.0/2/4`)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(1, dim),
            nn.SiLU(),
            nn.Linear(dim, dim),
            nn.SiLU(),
            nn.Linear(dim, heads),
        )

    def distance_table(self, max_distance: int) -> Tensor:
        """Bias (max_distance, heads) for distances 0..max_distance-1."""
        weight = self.mlp[0].weight
        distances = torch.arange(max_distance, dtype=weight.dtype, device=weight.device)  # (D,)
        return self.mlp(distances[:, None])  # (D, heads)

    def forward(self, i: int, j: int) -> Tensor:
        """Bias (heads, i, j) of the last i of j frame positions (queries) against all j (keys)."""
        if j < i:
            raise ValueError(f"dynamic position bias needs j >= i, got i={i}, j={j}")
        table = self.distance_table(j)  # (j, heads)
        device = table.device
        query_positions = torch.arange(j - i, j, device=device)  # (i,)
        key_positions = torch.arange(j, device=device)  # (j,)
        distance = (query_positions[:, None] - key_positions[None, :]).abs()  # (i, j)
        return rearrange(table[distance], "i j h -> h i j")


def l2norm(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1).to(x.dtype)
