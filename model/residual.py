"""Residual connections: a plain residual, or hyper-connections over several residual streams.

Hyper-connections (Zhu et al. 2024, arXiv:2409.19606) keep S copies of the residual stream per token,
held here as (b, n, S, d). Before a branch they mix the streams into one branch input and S new residuals
with weights alpha (S, 1 + S); after it they add the branch output to each stream with a weight beta (S,).
Both weights are a learned constant plus a small learned function of the (RMS-normalised) streams:

    alpha = static_alpha + alpha_scale * tanh(norm(H) @ dynamic_alpha_fn)      # (b, n, S, 1 + S)
    mixed = alpha^T H                                                          # (b, n, 1 + S, d)
    beta  = static_beta  + beta_scale  * tanh(norm(H) @ dynamic_beta_fn)       # (b, n, S)
    H'    = mixed[1:] + beta * branch(mixed[0])

Parameter names follow the hyper-connections package (0.4.x) so local-attention checkpoints load unchanged.
Every operation is per token, so cached decoding needs no extra state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, slots=True)
class StreamMixing:
    """The weights of one hyper-connection, as plain tensors (see the module docstring)."""

    norm_scale: float
    norm_gamma: Tensor  # (d,)
    static_alpha: Tensor  # (S, 1 + S)
    dynamic_alpha_fn: Tensor  # (d, 1 + S)
    dynamic_alpha_scale: Tensor  # ()
    static_beta: Tensor  # (S,)
    dynamic_beta_fn: Tensor  # (d,)
    dynamic_beta_scale: Tensor  # ()


def branch_input(mixing: StreamMixing | None, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Residual state x -> (input of the branch, residuals the output is added to, beta or None).

    With one stream (mixing None) that is (x, x, None); with S streams x is (..., S, d), the branch input
    (..., d), the residuals (..., S, d) and beta (..., S).
    """
    if mixing is None:
        return x, x, None
    normed = stream_rms_norm(x, mixing.norm_scale, mixing.norm_gamma)  # (..., S, d)
    alpha = torch.tanh(normed @ mixing.dynamic_alpha_fn) * mixing.dynamic_alpha_scale + mixing.static_alpha
    mixed = torch.einsum("...st,...sd->...td", alpha, x)  # (..., 1 + S, d)
    beta = torch.tanh(normed @ mixing.dynamic_beta_fn) * mixing.dynamic_beta_scale + mixing.static_beta
    return mixed[..., 0, :], mixed[..., 1:, :], beta


def add_branch_output(residuals: Tensor, beta: Tensor | None, branch_out: Tensor) -> Tensor:
    """The new residual state: residuals + branch output, weighted by beta per stream when there are streams."""
    if beta is None:
        return residuals + branch_out
    return residuals + beta[..., :, None] * branch_out[..., None, :]


def stream_rms_norm(x: Tensor, scale: float, gamma: Tensor) -> Tensor:
    """RMS normalisation with a zero-initialised gain offset: x / |x| * sqrt(d) * (1 + gamma)."""
    return F.normalize(x, dim=-1) * scale * (gamma + 1)


class Residual(nn.Module):
    """x + branch(x) on a single residual stream (b, n, d)."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def mixing(self) -> None:
        return None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x + self.branch(x, *args, **kwargs)


class StreamRMSNorm(nn.Module):
    """stream_rms_norm with a learned gamma (d,)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return stream_rms_norm(x, self.scale, self.gamma)


class HyperConnection(nn.Module):
    """Wraps a branch with hyper-connections over S residual streams (b, n, S, d)."""

    def __init__(self, num_streams: int, dim: int, branch: nn.Module, layer_index: int = 0) -> None:
        super().__init__()
        self.num_streams = num_streams
        self.branch = branch
        self.norm = StreamRMSNorm(dim)

        branch_from = torch.zeros(num_streams, 1)  # at init the branch reads one stream ...
        branch_from[layer_index % num_streams] = 1.0
        static_alpha = torch.cat((branch_from, torch.eye(num_streams)), dim=1)  # ... and streams pass through
        self.static_alpha = nn.Parameter(static_alpha)  # (S, 1 + S)
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, num_streams + 1))
        self.dynamic_alpha_scale = nn.Parameter(torch.tensor(1e-2))
        self.static_beta = nn.Parameter(torch.ones(num_streams))  # (S,)
        self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
        self.dynamic_beta_scale = nn.Parameter(torch.tensor(1e-2))

    def mixing(self) -> StreamMixing:
        return StreamMixing(
            norm_scale=self.norm.scale,
            norm_gamma=self.norm.gamma,
            static_alpha=self.static_alpha,
            dynamic_alpha_fn=self.dynamic_alpha_fn,
            dynamic_alpha_scale=self.dynamic_alpha_scale,
            static_beta=self.static_beta,
            dynamic_beta_fn=self.dynamic_beta_fn,
            dynamic_beta_scale=self.dynamic_beta_scale,
        )

    def forward(self, streams: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """streams (..., S, d) -> (..., S, d); extra arguments go to the branch."""
        branch_in, residuals, beta = branch_input(self.mixing(), streams)
        return add_branch_output(residuals, beta, self.branch(branch_in, *args, **kwargs))


class ResidualStreams(nn.Module):
    """Builds the residual wrapper of each branch and moves between one stream and S streams."""

    def __init__(self, num_streams: int) -> None:
        super().__init__()
        if num_streams < 1:
            raise ValueError(f"num_residual_streams must be at least 1, got {num_streams}")
        self.num_streams = num_streams

    def wrap(self, branch: nn.Module, dim: int, layer_index: int = 0) -> nn.Module:
        if self.num_streams == 1:
            return Residual(branch)
        return HyperConnection(self.num_streams, dim, branch, layer_index)

    def expand(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., S, d); one stream stays (..., d)."""
        if self.num_streams == 1:
            return x
        return x[..., None, :].expand(*x.shape[:-1], self.num_streams, x.shape[-1])

    def reduce(self, x: Tensor) -> Tensor:
        """(..., S, d) -> (..., d), the sum of the streams."""
        if self.num_streams == 1:
            return x
        return x.sum(dim=-2)
