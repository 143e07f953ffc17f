"""LocalMHA, the feed-forward block and LocalTransformer, with local-attention 1.11.2's arguments and keys."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model.attention import LocalAttention
from model.blocks import (
    AttentionWeights,
    FeedForwardWeights,
    NormWeights,
    attention_inputs,
    attention_output,
    feed_forward,
    geglu,
    project_logits,
)
from model.generate import generate, generate_uncached
from model.positions import ContextLimitError, DynamicPositionBias
from model.residual import ResidualStreams


class LocalMHA(nn.Module):
    """Multi-head local attention: projections, optional qk RMS norm and per-head value gates.

    Extra keyword arguments (look_backward, look_forward, shared_qk, use_rotary_pos_emb, ...) go to
    LocalAttention. The projections are called as functions of their weights (model.blocks), not as modules:
    hooks on them or modules swapped in for them are not run.
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

    Its forward is a function of the children's weights (model.blocks); the children are not called.
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
        x = F.embedding(tokens, self.token_emb.weight)
        if self.use_abs_pos_emb:
            if positions is None:
                positions = torch.arange(tokens.shape[-1], device=tokens.device)
            if int(positions.max()) >= self.max_seq_len:
                raise ContextLimitError(
                    f"position {int(positions.max())} is past max_seq_len {self.max_seq_len}: this model has "
                    "a learned absolute position embedding and no context beyond it"
                )
            x = x + F.embedding(positions, self.pos_emb.weight)
        return x

    def run_layers(self, x: Tensor, mask: Tensor | None = None, attn_bias: Tensor | None = None) -> Tensor:
        """Embeddings (b, n, dim) through every layer -> hidden states (b, n, dim), before the final norm."""
        x = self.streams.expand(x)
        for (attention, feed_forward_layer), global_layer in zip(self.layers, self.global_layers, strict=True):
            if global_layer is not None:
                x = global_layer(x)
            x = attention(x, mask=mask, attn_bias=attn_bias)
            x = feed_forward_layer(x)
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
        logits = self.logits(x)
        if not return_loss:
            return logits
        return F.cross_entropy(rearrange(logits, "b n c -> b c n"), labels, ignore_index=self.ignore_index)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states (b, n, dim) -> logits (b, n, num_tokens)."""
        norm, unembed = self.to_logits
        return project_logits(NormWeights.of(norm), unembed.weight, hidden)

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
        run = generate if use_kv_cache else generate_uncached
        was_training = self.training
        self.eval()
        try:
            return run(self, prime, seq_len, temperature=temperature, filter_thres=filter_thres, seed=seed)
        finally:
            self.train(was_training)
