"""LocalTransformer: embeddings, a stack of LocalMHA and feed-forward layers (model.blocks), the unembedding.

Its arguments and state-dict keys are local-attention 1.11.2's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model.blocks import FeedForward, LocalMHA, NormWeights, project_logits
from model.generate import generate, generate_uncached
from model.positions import ContextLimitError, DynamicPositionBias
from model.residual import ResidualStreams


@dataclass(frozen=True)
class LayerOptions:
    """The LocalTransformer arguments every layer is built from; `attention_kwargs` go on to LocalMHA."""

    dim: int
    dim_head: int
    heads: int
    ff_mult: float
    attn_dropout: float
    ff_dropout: float
    causal: bool
    window_size: int
    use_xpos: bool
    xpos_scale_base: float | None
    use_dynamic_pos_bias: bool
    attention_kwargs: dict[str, Any]

    def attention(self) -> LocalMHA:
        """A fresh pre-norm LocalMHA; rotary embeddings unless the dynamic position bias replaces them."""
        return LocalMHA(
            dim=self.dim,
            dim_head=self.dim_head,
            heads=self.heads,
            dropout=self.attn_dropout,
            causal=self.causal,
            window_size=self.window_size,
            use_xpos=self.use_xpos,
            xpos_scale_base=self.xpos_scale_base,
            use_rotary_pos_emb=not self.use_dynamic_pos_bias,
            prenorm=True,
            **self.attention_kwargs,
        )

    def feed_forward(self) -> FeedForward:
        return FeedForward(dim=self.dim, mult=self.ff_mult, dropout=self.ff_dropout)


def dynamic_position_bias(dim: int, heads: int, causal: bool, attention_kwargs: dict[str, Any]) -> DynamicPositionBias:
    """The bias shared by every layer; its (W, 2W) frame only fits attention that looks at two windows."""
    look_backward = attention_kwargs.get("look_backward", 1)
    look_forward = attention_kwargs.get("look_forward", 0 if causal else 1)
    if look_backward + look_forward != 1:
        raise ValueError("dynamic position bias spans two windows: it needs look_backward + look_forward == 1")
    return DynamicPositionBias(dim=dim // 2, heads=heads)


def global_layer_numbers(depth: int, layers_insert_global_attn: tuple[int, ...] | None) -> set[int]:
    """The 1-based numbers of the layers a global layer runs before; None means every layer."""
    numbers = set(range(1, depth + 1) if layers_insert_global_attn is None else layers_insert_global_attn)
    if not all(0 < number <= depth for number in numbers):
        raise ValueError(f"layers_insert_global_attn must name layers 1..{depth}")
    return numbers


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

        # The order submodules are made in fixes the state dict's key order and, under a seed, the initial weights.
        self._build_embeddings(num_tokens, max_seq_len, dim)
        self.dynamic_pos_bias = dynamic_position_bias(dim, heads, causal, kwargs) if use_dynamic_pos_bias else None
        self.streams = ResidualStreams(num_residual_streams)
        layer_options = LayerOptions(
            dim=dim,
            dim_head=dim_head,
            heads=heads,
            ff_mult=ff_mult,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            causal=causal,
            window_size=local_attn_window_size,
            use_xpos=use_xpos,
            xpos_scale_base=xpos_scale_base,
            use_dynamic_pos_bias=use_dynamic_pos_bias,
            attention_kwargs=kwargs,
        )
        self._build_layers(depth, layer_options, global_attn_layer, layers_insert_global_attn)
        if self.has_embed_unembed:
            self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens, bias=False))

    def _build_embeddings(self, num_tokens: int | None, max_seq_len: int, dim: int) -> None:
        """The token embedding, and the learned absolute position embedding when the model has one."""
        if self.has_embed_unembed:
            self.token_emb = nn.Embedding(num_tokens, dim)
        if self.use_abs_pos_emb:
            self.pos_emb = nn.Embedding(max_seq_len, dim)

    def _build_layers(
        self,
        depth: int,
        options: LayerOptions,
        global_attn_layer: nn.Module | None,
        layers_insert_global_attn: tuple[int, ...] | None,
    ) -> None:
        """`depth` layers of residual-wrapped attention and feed-forward, each optionally after a global layer.

        `global_layers[i]` is the copy of `global_attn_layer` run before layer i, or None; the reference
        numbers layers from 1 in `layers_insert_global_attn` (None: every layer).
        """
        numbers = global_layer_numbers(depth, layers_insert_global_attn)
        self.layers = nn.ModuleList()
        self.global_layers = nn.ModuleList()
        for index in range(depth):
            global_layer = None
            if global_attn_layer is not None and index + 1 in numbers:
                global_layer = self.streams.wrap(copy.deepcopy(global_attn_layer), options.dim, layer_index=index)
            self.global_layers.append(global_layer)
            attention, feed_forward = options.attention(), options.feed_forward()
            self.layers.append(
                nn.ModuleList(
                    [
                        self.streams.wrap(attention, options.dim, layer_index=index),
                        self.streams.wrap(feed_forward, options.dim, layer_index=index),
                    ]
                )
            )

    @property
    def attention_layers(self) -> list[LocalMHA]:
        return [attention.branch for attention, _ in self.layers]

    def position_bias(self) -> Tensor | None:
        """The dynamic position bias (heads, W, 2W) shared by every layer, or None."""
        if self.dynamic_pos_bias is None:
            return None
        window = self.local_attn_window_size
        return self.dynamic_pos_bias(window, window * 2)

    def embed(self, tokens: Tensor, positions: Tensor | None = None, checked: bool = True) -> Tensor:
        """Token ids (b, n) at absolute positions (n,) -> embeddings (b, n, dim).

        Unchecked (a compiled step, which must not ask the device), positions past max_seq_len are the caller's
        to prevent (the server's scheduler does); they are clamped, never read out of bounds."""
        x = F.embedding(tokens, self.token_emb.weight)
        if self.use_abs_pos_emb:
            if positions is None:
                positions = torch.arange(tokens.shape[-1], device=tokens.device)
            if not checked:
                positions = positions.clamp(max=self.max_seq_len - 1)
            elif int(positions.max()) >= self.max_seq_len:
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
