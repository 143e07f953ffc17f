"""Attention of new tokens against the sliding KV cache: the position arithmetic of one cached step.

A step feeds L new tokens to each of B slots, slot b starting at position t0[b]. Everything that depends only
on positions (which keys each query may see, rotary angles, xpos scales, the dynamic position bias) is computed
once per step in a `StepPlan` and shared by every layer.

Two key layouts:
- decode (L == 1): the new key is written to the ring first, then the query attends to the ring alone;
- prefill (L > 1): the query block attends to the ring as it was plus the L new keys, which are written after.

Rotary angles and xpos exponents are taken relative to the frame start (t0 // W - lb) * W of the step's first
query, so they stay below (lb + 1) * W + L however far into the text the step is. The product q . k depends
only on the distance between the two positions, as in the reference's full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention import SELF_ATTENTION_LOGIT
from model.cache import SlidingKVCache, Slots, WriteTarget, cache_capacity
from model.positions import Rotation


@dataclass
class StepPlan:
    """Position-derived tensors for one cached step, shared by all layers."""

    slots: Slots  # (B,) long, or every slot
    write_target: WriteTarget  # where every layer stores the step's keys and values
    write_first: bool  # decode layout (L == 1)
    score_bias: Tensor  # (B, 1 or heads, L, K): the position bias, and a huge negative for keys not to see
    self_key: Tensor | None  # (B, 1, L, K) bool: a query's own key (shared_qk only)
    query_rotation: Rotation | None  # of the L queries
    key_rotation: Rotation | None  # of the K keys, with the inverse xpos scale


class StepPlanner:
    """Builds StepPlans for one causal model; holds its position encodings' constants."""

    def __init__(self, model: torch.nn.Module) -> None:
        attention_layers = model.attention_layers
        first = attention_layers[0].attn_fn
        if not model.causal or first.look_forward:
            raise ValueError("only causal models (look_forward=0) can decode with the sliding cache")
        if any(layer is not None for layer in model.global_layers):
            raise ValueError("models with global attention layers cannot decode with the sliding cache")
        self.window_size = first.window_size
        self.look_backward = first.look_backward
        self.exact_windowsize = first.exact_windowsize
        self.shared_qk = first.shared_qk
        self.capacity = cache_capacity(self.window_size, self.look_backward, self.exact_windowsize)
        self.frame_len = (self.look_backward + 1) * self.window_size

        self.rotary = first.rel_pos
        if self.rotary is not None:
            for layer in attention_layers[1:]:
                if not torch.equal(layer.attn_fn.rel_pos.inv_freq, self.rotary.inv_freq):
                    raise ValueError("layers with different rotary frequencies cannot share a position plan")

        self.bias_table = None  # (distance, heads)
        if model.dynamic_pos_bias is not None:
            with torch.no_grad():
                self.bias_table = model.dynamic_pos_bias.distance_table(2 * self.window_size)

    def plan(self, cache: SlidingKVCache, slots: Slots, query_positions: Tensor) -> StepPlan:
        """The plan of feeding new tokens at positions (B, L) (first..first+L-1 of each slot) to `slots`."""
        window, look_backward = self.window_size, self.look_backward
        length = query_positions.shape[1]
        first = query_positions[:, 0]  # (B,)
        write_first = length == 1
        if write_first:
            key_positions = cache.ring_positions(first)  # (B, C)
        else:
            key_positions = torch.cat((cache.ring_positions(first - 1), query_positions), dim=1)  # (B, C + L)

        q = query_positions[:, :, None]  # (B, L, 1)
        k = key_positions[:, None, :]  # (B, 1, K)
        lowest = q - window * look_backward if self.exact_windowsize else (q // window - look_backward) * window
        start = cache.starts[slots][:, None, None]  # (B, 1, 1)
        blocked = (k < start) | (k > q) | (k < lowest)  # (B, L, K)
        self_key = (k == q)[:, None] if self.shared_qk else None

        query_rotation = key_rotation = None
        if self.rotary is not None:
            frame_start = ((first // window - look_backward) * window)[:, None]  # (B, 1)
            # positions (B, 1, P): the rotations come out (B, 1, P, dh), ready for (B, heads, P, dh)
            query_rotation = self.rotary.rotation((query_positions - frame_start)[:, None], self.frame_len, False)
            key_rotation = self.rotary.rotation((key_positions - frame_start)[:, None], self.frame_len, True)

        dtype = cache.keys.dtype
        if self.bias_table is None:
            score_bias = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)[:, None]  # (B, 1, L, K)
        else:
            distance = (q - k).clamp(0, self.bias_table.shape[0] - 1)  # (B, L, K)
            score_bias = self.bias_table.to(dtype)[distance].permute(0, 3, 1, 2)  # (B, heads, L, K)
        # half the most negative number: far below any score, and no overflow to -inf when a bias is added
        score_bias = score_bias.masked_fill(blocked[:, None], torch.finfo(dtype).min / 2)

        return StepPlan(
            slots=slots,
            write_target=cache.write_target(slots, first, length),
            write_first=write_first,
            score_bias=score_bias,
            self_key=self_key,
            query_rotation=query_rotation,
            key_rotation=key_rotation,
        )


def attend(q: Tensor, keys: Tensor, values: Tensor, plan: StepPlan, scale: float) -> Tensor:
    """q (B, h, L, dh) against keys and values (B, h, K, dh) -> (B, h, L, dh)."""
    if plan.query_rotation is not None:
        q = plan.query_rotation.apply(q)
        keys = plan.key_rotation.apply(keys)
    if plan.self_key is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.score_bias, scale=scale)
    # shared_qk: a query sees its own key only when nothing else is allowed (its logit is replaced)
    sim = (q * scale) @ keys.transpose(-1, -2)  # (B, h, L, K)
    sim = sim.masked_fill(plan.self_key, SELF_ATTENTION_LOGIT) + plan.score_bias
    return sim.softmax(dim=-1) @ values


@dataclass
class CachedStep:
    """What one attention layer needs to run a cached step."""

    cache: SlidingKVCache
    layer: int
    plan: StepPlan

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """New q, k, v (B, h, L, dh) of this layer -> attention output (B, h, L, dh); stores k and v."""
        plan, cache = self.plan, self.cache
        if plan.write_first:
            cache.write(self.layer, plan.write_target, k, v)
            keys, values = cache.read(self.layer, plan.slots)  # (B, h, C, dh)
        else:
            ring_keys, ring_values = cache.read(self.layer, plan.slots)
            keys = torch.cat((ring_keys, k), dim=2)  # (B, h, C + L, dh)
            values = torch.cat((ring_values, v), dim=2)
            cache.write(self.layer, plan.write_target, k, v)
        return attend(q, keys, values, plan, scale)
