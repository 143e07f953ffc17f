"""LocalMHA, the feed-forward block and LocalTransformer, with local-attention 1.11.2's arguments and keys."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model.attention import LocalAttention
from model.decode import CachedStep
from model.positions import DynamicPositionBias, l2norm
from model.residual import ResidualStreams


class ContextLimitError(ValueError):
    """A position past max_seq_len of a model with a learned absolute position embedding."""


class LocalMHA(nn.Module):
    """Multi-head local attention: projections, optional qk RMS norm and per-head value gates.

    Extra keyword arguments (look_backward, look_forward, shared_qk, use_rotary_pos_emb, ...) go to
    LocalAttention.
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

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Input (b, n, dim) -> normed input (b, n, dim) and q, k, v (b, h, n, dh)."""
        if self.norm is not None:
            x = self.norm(x)
        batch, length, _ = x.shape
        qkv = self.to_qkv(x).view(batch, length, 3, self.heads, self.dim_head)  # (b, n, 3, h, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, n, dh); plain views: this runs every token
        if self.qk_rmsnorm:
            q = l2norm(q) * self.q_scale
            k = l2norm(k) * self.k_scale
        return x, q, k, v

    def output(self, x: Tensor, attended: Tensor) -> Tensor:
        """Normed input (b, n, dim) and attention output (b, h, n, dh) -> (b, n, dim)."""
        if self.to_v_gate is not None:
            gates = rearrange(self.to_v_gate(x), "b n h -> b h n 1")
            attended = attended * gates.sigmoid()
        batch, _, length, _ = attended.shape
        return self.to_out(attended.transpose(1, 2).reshape(batch, length, -1))  # (b, n, h * dh)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        attn_bias: Tensor | None = None,
        cached: CachedStep | None = None,
    ) -> Tensor:
        """x (b, n, dim), mask (b, n) of positions to keep, attn_bias (h, W, frame) -> (b, n, dim).

        With `cached`, x holds the new tokens of a cached step and attends to the sliding KV cache instead.
        """
        x, q, k, v = self.project(x)
        if cached is None:
            return self.output(x, self.attn_fn(q, k, v, mask=mask, attn_bias=attn_bias))
        if self.attn_fn.shared_qk:
            k = l2norm(k)
        scale = self.dim_head**-0.5 if self.attn_fn.scale is None else self.attn_fn.scale
        return self.output(x, cached.attend(q, k, v, scale))


class GEGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Sequential):
    """Pre-norm GEGLU feed-forward; the layer indices (0, 1, 4) match the reference's state dict."""

    def __init__(self, dim: int, mult: float = 4, dropout: float = 0.0) -> None:
        inner_dim = int(dim * mult * 2 / 3)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner_dim * 2, bias=False),
            GEGLU(),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim, bias=False),
        )


class LocalTransformer(nn.Module):
    """A stack of local attention and feed-forward layers; local-attention 1.11.2's LocalTransformer.

    Beyond the reference, `use_abs_pos_emb=False` drops the learned absolute position embedding: the model
    is then purely relative and has no length limit.
    """

    def __init__(
        self,
        *,
        num_tokens: int | None,
        max_seq_len: int,
        dim: int,
        depth: int,
        causal: bool = True,
        local_attn_window_size: int = 512,
        dim_head: int = 64,
        heads: int = 8,
        ff_mult: float = 4,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        ignore_index: int = -1,
        use_xpos: bool = False,
        xpos_scale_base: float | None = None,
        use_dynamic_pos_bias: bool = False,
        global_attn_layer: nn.Module | None = None,
        layers_insert_global_attn: tuple[int, ...] | None = None,
        num_residual_streams: int = 4,
        use_abs_pos_emb: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.dim = dim
        self.causal = causal
        self.local_attn_window_size = local_attn_window_size
        self.ignore_index = ignore_index
        self.has_embed_unembed = num_tokens is not None
        self.use_abs_pos_emb = use_abs_pos_emb and self.has_embed_unembed

        if self.has_embed_unembed:
            self.token_emb = nn.Embedding(num_tokens, dim)
        if self.use_abs_pos_emb:
            self.pos_emb = nn.Embedding(max_seq_len, dim)

        self.dynamic_pos_bias = None
        if use_dynamic_pos_bias:
            look_backward = kwargs.get("look_backward", 1)
            look_forward = kwargs.get("look_forward", 0 if causal else 1)
            if look_backward + look_forward != 1:
                raise ValueError("dynamic position bias spans two windows: it needs look_backward + look_forward == 1")
            self.dynamic_pos_bias = DynamicPositionBias(dim=dim // 2, heads=heads)

        self.streams = ResidualStreams(num_residual_streams)
        global_layer_numbers = set(
            range(1, depth + 1) if layers_insert_global_attn is None else layers_insert_global_attn
        )
        if not all(0 < number <= depth for number in global_layer_numbers):
            raise ValueError(f"layers_insert_global_attn must name layers 1..{depth}")

        self.layers = nn.ModuleList()
        self.global_layers = nn.ModuleList()
        for index in range(depth):
            global_layer = None
            if global_attn_layer is not None and index + 1 in global_layer_numbers:
                global_layer = self.streams.wrap(copy.deepcopy(global_attn_layer), dim, layer_index=index)
            self.global_layers.append(global_layer)
            attention = LocalMHA(
                dim=dim,
                dim_head=dim_head,
                heads=heads,
                dropout=attn_dropout,
                causal=causal,
                window_size=local_attn_window_size,
                use_xpos=use_xpos,
                xpos_scale_base=xpos_scale_base,
                use_rotary_pos_emb=not use_dynamic_pos_bias,
                prenorm=True,
                **kwargs,
            )
            feed_forward = FeedForward(dim=dim, mult=ff_mult, dropout=ff_dropout)
            self.layers.append(
                nn.ModuleList(
                    [
                        self.streams.wrap(attention, dim, layer_index=index),
                        self.streams.wrap(feed_forward, dim, layer_index=index),
                    ]
                )
            )

        if self.has_embed_unembed:
            self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens, bias=False))

    @property
    def attention_layers(self) -> list[LocalMHA]:
        return [attention.branch for attention, _ in self.layers]

    def position_bias(self) -> Tensor | None:
        """The dynamic position bias (heads, W, 2W) shared by every layer, or None."""
        if self.dynamic_pos_bias is None:
            return None
        window = self.local_attn_window_size
        return self.dynamic_pos_bias(window, window * 2)

    def embed(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """Token ids (b, n) at absolute positions (n,) -> embeddings (b, n, dim)."""
        x = self.token_emb(tokens)
        if self.use_abs_pos_emb:
            if positions is None:
                positions = torch.arange(tokens.shape[-1], device=tokens.device)
            if int(positions.max()) >= self.max_seq_len:
                raise ContextLimitError(
                    f"position {int(positions.max())} is past max_seq_len {self.max_seq_len}: this model has "
                    "a learned absolute position embedding and no context beyond it"
                )
            x = x + self.pos_emb(positions)
        return x

    def run_layers(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        attn_bias: Tensor | None = None,
        cached_steps: list[CachedStep] | None = None,
    ) -> Tensor:
        """Embeddings (b, n, dim) through every layer -> hidden states (b, n, dim), before the final norm."""
        x = self.streams.expand(x)
        for index, ((attention, feed_forward), global_layer) in enumerate(
            zip(self.layers, self.global_layers, strict=True)
        ):
            if global_layer is not None:
                x = global_layer(x)
            cached = None if cached_steps is None else cached_steps[index]
            x = attention(x, mask=mask, attn_bias=attn_bias, cached=cached)
            x = feed_forward(x)
        return self.streams.reduce(x)

    def forward(self, x: Tensor, mask: Tensor | None = None, return_loss: bool = False) -> Tensor:
        """Token ids (b, n) -> logits (b, n, num_tokens), or the next-token loss with `return_loss`.

        Without num_tokens, x is (b, n, dim) and the output the final hidden states (b, n, dim).
        """
        if return_loss:
            x, labels = x[:, :-1], x[:, 1:]
        if self.has_embed_unembed:
            x = self.embed(x)

        x = self.run_layers(x, mask=mask, attn_bias=self.position_bias())
        if not self.has_embed_unembed:
            return x
        logits = self.to_logits(x)
        if not return_loss:
            return logits
        return F.cross_entropy(rearrange(logits, "b n c -> b c n"), labels, ignore_index=self.ignore_index)

    def generate(
        self,
        prime: Tensor,
        seq_len: int,
        temperature: float = 1.0,
        filter_thres: float = 0.9,
        use_kv_cache: bool = True,
        seed: int | None = None,
    ) -> Tensor:
        """Sample seq_len tokens after prime (b, n) -> (b, seq_len); local-attention's generate signature.

        With the cache (the default) each token costs the same however long the text; without it every step
        runs the full forward over the last max_seq_len tokens. `seed` makes sampling reproducible.
        """
        from model.generate import generate, generate_uncached

        run = generate if use_kv_cache else generate_uncached
        was_training = self.training
        self.eval()
        try:
            return run(self, prime, seq_len, temperature=temperature, filter_thres=filter_thres, seed=seed)
        finally:
            self.train(was_training)
