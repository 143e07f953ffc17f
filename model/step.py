"""One cached step: new tokens of many slots through the model's layers against the sliding KV cache.

A step feeds L new tokens to each of B slots, slot b starting at position t0[b]. Everything that depends only
on positions (which keys each query may see, rotary angles, xpos scales, the dynamic position bias) is computed
once per step in a `StepPlan` and shared by every layer.

Two key layouts:
- decode (L == 1): the new key is written to the ring first, then the query attends to the ring alone;
- prefill (L > 1): the query block attends to the ring as it was plus the L new keys, which are written after.

Rotary angles and xpos exponents are taken relative to the frame start (t0 // W - lb) * W of the step's first
query, so they stay below (lb + 1) * W + L however far into the text the step is. The product q . k depends
only on the distance between the two positions, as in the reference's full forward.

`CachedLayers` runs the layers themselves on plain weight records (model.blocks) rather than through the
modules: the per-token arithmetic is the same, without dozens of module calls per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention import SELF_ATTENTION_LOGIT
from model.blocks import (
    AttentionWeights,
    FeedForwardWeights,
    NormWeights,
    attention_inputs,
    attention_output,
    feed_forward,
    project_logits,
)
from model.cache import SlidingKVCache, Slots, StepRings, cache_capacity
from model.positions import Rotation, l2norm
from model.residual import StreamMixing, add_branch_output, branch_input


@dataclass
class StepPlan:
    """Position-derived tensors for one cached step, shared by all layers."""

    rings: StepRings  # where every layer reads the slots' keys and values and stores the step's
    write_first: bool  # decode layout (L == 1)
    score_bias: Tensor  # (B, 1 or heads, L, K): the position bias, and a huge negative for keys not to see
    self_key: Tensor | None  # (B, 1, L, K) bool: a query's own key (shared_qk only)
    query_rotation: Rotation | None  # of the L queries
    key_rotation: Rotation | None  # of the K keys, with the inverse xpos scale
    packing: Packing | None = None  # rows of different lengths, packed end to end outside attention
    # decode attention written as products and sums (float32 on a CPU), which a compiler fuses into loops that
    # read each key and value once (model.compiled_step); the fused kernel would be an opaque call
    for_compiler: bool = False


@dataclass(frozen=True)
class Packing:
    """Rows of different lengths (prompt chunks of several slots): end to end, (1, T), for the per-token work
    (projections, feed-forward), padded to the longest, (B, L), for attention against each slot's ring.

    Padding repeats its row's last token at later positions: causality keeps it from every real query, its
    keys are not stored, and its outputs are dropped when the rows are packed again.
    """

    lengths: Tensor  # (B,), on the CPU
    length: int  # L, the longest
    padded_from_packed: Tensor  # (B * L,): the packed token at each padded place
    packed_from_padded: Tensor  # (T,): the padded place of each packed token

    @classmethod
    def of(cls, lengths: list[int], device: torch.device) -> Packing:
        """The packing of rows of `lengths`, its indices made on the CPU (known there: no device sync) and
        copied to `device` once."""
        counts = torch.tensor(lengths)  # (B,)
        length = max(lengths)
        offsets = torch.arange(length)  # (L,)
        starts = torch.cumsum(counts, 0) - counts  # (B,): each row's first packed token
        real = offsets < counts[:, None]  # (B, L)
        padded_from_packed = (starts[:, None] + torch.minimum(offsets, counts[:, None] - 1)).flatten()  # (B * L,)
        packed_from_padded = real.flatten().nonzero().flatten()  # (T,)
        return cls(counts, length, padded_from_packed.to(device), packed_from_padded.to(device))

    def unpack(self, x: Tensor) -> Tensor:
        """(1, h, T, dh) -> (B, h, L, dh)."""
        heads, dim_head = x.shape[1], x.shape[3]
        padded = x[0].index_select(1, self.padded_from_packed)  # (h, B * L, dh)
        return padded.view(heads, len(self.lengths), self.length, dim_head).transpose(0, 1)

    def pack(self, x: Tensor) -> Tensor:
        """(B, h, L, dh) -> (1, h, T, dh)."""
        heads, dim_head = x.shape[1], x.shape[3]
        return x.transpose(0, 1).reshape(heads, -1, dim_head).index_select(1, self.packed_from_padded)[None]


class StepPlanner(torch.nn.Module):
    """Builds StepPlans for one causal model; holds its position encodings' constants (as buffers, so that a
    compiled step sees them as constants of the module it belongs to)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
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

        # the score added for a key a query may not see: half the most negative number, far below any score,
        # and no overflow to -inf when a bias is added
        blocked_score = torch.tensor(torch.finfo(dtype).min / 2, dtype=dtype, device=device)
        self.register_buffer("blocked_score", blocked_score, persistent=False)
        self.register_buffer("open_score", torch.zeros((), dtype=dtype, device=device), persistent=False)
        table = None  # (distance, heads) for distances 0..2W-1, then a row of blocked scores
        if model.dynamic_pos_bias is not None:
            with torch.no_grad():
                table = model.dynamic_pos_bias.distance_table(2 * self.window_size).to(dtype)
            self.blocked_row = table.shape[0]
            table = torch.cat((table, blocked_score.expand(1, table.shape[1])))
        self.register_buffer("bias_table", table, persistent=False)

    def plan(
        self, cache: SlidingKVCache, slots: Slots, query_positions: Tensor, packing: Packing | None = None
    ) -> StepPlan:
        """The plan of feeding new tokens at positions (B, L) (first..first+L-1 of each slot) to `slots`; with
        a `packing`, rows of its lengths, packed (see Packing)."""
        length = query_positions.shape[1]
        first = query_positions[:, 0]  # (B,)
        start = cache.starts[slots]  # (B,)
        if length == 1:
            key_positions, distance, blocked = self.decode_visibility(cache, first, start)
        else:
            key_positions, distance, blocked = self.prefill_visibility(cache, query_positions, start)

        query_rotation = key_rotation = None
        if self.rotary is not None:
            frame_start = ((first // self.window_size - self.look_backward) * self.window_size)[:, None]  # (B, 1)
            # positions (B, 1, P): the rotations come out (B, 1, P, dh), ready for (B, heads, P, dh)
            query_rotation = self.rotary.rotation((query_positions - frame_start)[:, None], self.frame_len, False)
            key_rotation = self.rotary.rotation((key_positions - frame_start)[:, None], self.frame_len, True)

        if self.bias_table is None:
            score_bias = torch.where(blocked, self.blocked_score, self.open_score)[:, None]  # (B, 1, L, K)
        else:
            row = torch.where(blocked, self.blocked_row, distance)  # (B, L, K)
            score_bias = F.embedding(row, self.bias_table).permute(0, 3, 1, 2).contiguous()  # (B, heads, L, K)

        return StepPlan(
            rings=(
                cache.step_rings(slots, first, length)
                if packing is None
                else cache.ragged_rings(slots, first, length, packing.lengths)
            ),
            write_first=length == 1,
            score_bias=score_bias,
            self_key=(distance == 0)[:, None] if self.shared_qk else None,
            query_rotation=query_rotation,
            key_rotation=key_rotation,
            packing=packing,
        )

    def decode_visibility(
        self, cache: SlidingKVCache, position: Tensor, start: Tensor
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """One query per slot at position t (B,) against the ring after t is written.

        Returns key positions (B, C) (rotary models only), distances t - key (B, 1, C) and which keys are
        blocked (B, 1, C). The ring holds t and the C - 1 positions before it, all causal and none older than
        an exact window; what can be blocked is a key before the text's start or, with bucketed windows, one
        before the frame.
        """
        position = position[:, None]  # (B, 1)
        distance = (position - cache.ring_index) % cache.capacity  # (B, C)
        farthest = position - start[:, None]  # (B, 1)
        if not self.exact_windowsize:
            farthest = torch.minimum(farthest, position % self.window_size + self.look_backward * self.window_size)
        key_positions = position - distance if self.rotary is not None else None
        return key_positions, distance[:, None], (distance > farthest)[:, None]

    def prefill_visibility(
        self, cache: SlidingKVCache, query_positions: Tensor, start: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries at positions (B, L) against the ring before they are written followed by their own keys.

        Returns key positions (B, K), distances query - key (B, L, K) and which keys are blocked (B, L, K).
        """
        window, look_backward = self.window_size, self.look_backward
        ring = cache.ring_positions(query_positions[:, 0] - 1)  # (B, C)
        key_positions = torch.cat((ring, query_positions), dim=1)  # (B, C + L)
        q = query_positions[:, :, None]  # (B, L, 1)
        k = key_positions[:, None, :]  # (B, 1, K)
        lowest = q - window * look_backward if self.exact_windowsize else (q // window - look_backward) * window
        blocked = (k < start[:, None, None]) | (k > q) | (k < lowest)  # (B, L, K)
        return key_positions, q - k, blocked


# On a CPU, PyTorch's fused attention runs one small product per (slot, head) row of a decode step; from this
# many rows on, two batched matrix products over all rows read the cache faster (server/bench/README.md).
# Float32 only: the fused kernel keeps half-precision scores in float32, the batched products would not.
CPU_BATCHED_DECODE_ROWS = 32


def attend(q: Tensor, keys: Tensor, values: Tensor, plan: StepPlan, scale: float) -> Tensor:
    """q (B, h, L, dh) against keys and values (B, h, K, dh) -> (B, h, L, dh)."""
    if plan.query_rotation is not None:
        q = plan.query_rotation.apply(q)
        keys = plan.key_rotation.apply(keys)
    if plan.self_key is None:
        batch, heads, length, _ = q.shape
        cpu_float32 = q.device.type == "cpu" and q.dtype == torch.float32
        if length == 1 and cpu_float32 and plan.for_compiler:
            return summed_attention(q, keys, values, plan.score_bias, scale)
        if length == 1 and cpu_float32 and batch * heads >= CPU_BATCHED_DECODE_ROWS:
            return batched_attention(q, keys, values, plan.score_bias, scale)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.score_bias, scale=scale)
    # shared_qk: a query sees its own key only when nothing else is allowed (its logit is replaced)
    sim = (q * scale) @ keys.transpose(-1, -2)  # (B, h, L, K)
    sim = sim.masked_fill(plan.self_key, SELF_ATTENTION_LOGIT) + plan.score_bias
    return sim.softmax(dim=-1) @ values


def summed_attention(q: Tensor, keys: Tensor, values: Tensor, score_bias: Tensor, scale: float) -> Tensor:
    """Attention of one query per row as elementwise products and sums: q (B, h, 1, dh) -> (B, h, 1, dh). Slow
    in eager mode; compiled, a loop over each row's keys and one over its values (measured at batch 32 on the
    bench model: 8 % faster than compiling batched_attention, 12 % faster than the fused kernel)."""
    scores = ((q * scale) * keys).sum(dim=-1)[:, :, None, :] + score_bias  # (B, h, 1, K)
    weights = scores.softmax(dim=-1)
    return (weights.transpose(-1, -2) * values).sum(dim=-2, keepdim=True)  # (B, h, K, 1) x (B, h, K, dh)


def batched_attention(q: Tensor, keys: Tensor, values: Tensor, score_bias: Tensor, scale: float) -> Tensor:
    """Attention as two batched matrix products over the B * h rows: q (B, h, L, dh) -> (B, h, L, dh)."""
    batch, heads, length, dim_head = q.shape
    rows, key_count = batch * heads, keys.shape[2]
    bias = score_bias.expand(batch, heads, length, key_count).reshape(rows, length, key_count)
    keys_t = keys.reshape(rows, key_count, dim_head).transpose(1, 2)  # (rows, dh, K)
    scores = torch.baddbmm(bias, q.reshape(rows, length, dim_head), keys_t, alpha=scale)  # (rows, L, K)
    attended = torch.bmm(scores.softmax(dim=-1), values.reshape(rows, key_count, dim_head))  # (rows, L, dh)
    return attended.view(batch, heads, length, dim_head)


@dataclass(frozen=True, slots=True)
class CachedLayer:
    """One layer's weights for the cached step: attention and feed-forward, each with its residual mixing."""

    attention: AttentionWeights
    attention_mixing: StreamMixing | None
    scale: float  # of the attention logits
    shared_qk: bool
    feed_forward: FeedForwardWeights
    feed_forward_mixing: StreamMixing | None


class CachedLayers:
    """A LocalTransformer's layers and output head over the sliding KV cache, calling no module.

    The records hold the model's Parameter objects themselves, so weights loaded into them in place (as
    load_state_dict does) are used at once; a model whose Parameters are replaced needs a new Decoder, as
    does a change to the dynamic position bias, whose table the StepPlanner computes once.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.streams = model.streams
        norm, unembed = model.to_logits
        self.final_norm = NormWeights.of(norm)
        self.unembed = unembed.weight
        self.layers = []
        for attention, feed_forward_layer in model.layers:
            attend_fn = attention.branch.attn_fn
            self.layers.append(
                CachedLayer(
                    attention=attention.branch.weights(),
                    attention_mixing=attention.mixing(),
                    scale=attend_fn.logit_scale(attention.branch.dim_head),
                    shared_qk=attend_fn.shared_qk,
                    feed_forward=feed_forward_layer.branch.weights(),
                    feed_forward_mixing=feed_forward_layer.mixing(),
                )
            )

    def run(self, x: Tensor, plan: StepPlan) -> Tensor:
        """Embeddings of the step's new tokens (B, L, dim) -> final hidden states (B, L, dim); stores their keys."""
        x = self.streams.expand(x)
        for index, layer in enumerate(self.layers):
            branch_in, residuals, beta = branch_input(layer.attention_mixing, x)
            normed, q, k, v = attention_inputs(layer.attention, branch_in)
            if layer.shared_qk:
                k = l2norm(k)
            attended = cached_attention(index, plan, q, k, v, layer.scale)
            x = add_branch_output(residuals, beta, attention_output(layer.attention, normed, attended))

            branch_in, residuals, beta = branch_input(layer.feed_forward_mixing, x)
            x = add_branch_output(residuals, beta, feed_forward(layer.feed_forward, branch_in))
        return self.streams.reduce(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states (B, L, dim) -> logits (B, L, num_tokens)."""
        return project_logits(self.final_norm, self.unembed, hidden)


def cached_attention(layer: int, plan: StepPlan, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """New q, k, v (B, h, L, dh) of one layer -> attention output (B, h, L, dh); stores k and v. Packed rows
    come in and go out as (1, h, T, dh)."""
    if plan.packing is not None:
        q, k, v = (plan.packing.unpack(x) for x in (q, k, v))  # (B, h, L, dh) each
    rings = plan.rings
    if plan.write_first:
        rings.write(layer, k, v)
        keys, values = rings.read(layer)  # (B, h, C, dh)
    else:
        ring_keys, ring_values = rings.read(layer)
        keys = torch.cat((ring_keys, k), dim=2)  # (B, h, C + L, dh)
        values = torch.cat((ring_values, v), dim=2)
        rings.write(layer, k, v)
    attended = attend(q, keys, values, plan, scale)  # (B, h, L, dh)
    return attended if plan.packing is None else plan.packing.pack(attended)
