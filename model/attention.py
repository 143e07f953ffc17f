"""Local attention over windows of W positions, with the semantics of local-attention 1.11.2.

The sequence is cut into windows (buckets) of W positions. A query in window w sees the keys of windows
w - lb .. w + lf (lb = look_backward, lf = look_forward); causal attention also requires key <= query, and
exact window sizes cut the frame down to keys within lb * W behind (and lf * W ahead of) the query.
Scores are built window by window, so memory and time grow as n * (lb + 1 + lf) * W, never n * n.
"""

from __future__ import annotations

import torch
from einops import pack, rearrange, repeat, unpack
from torch import Tensor, nn

from model.positions import RotaryEmbedding, l2norm

SELF_ATTENTION_LOGIT = -5e4  # with shared_qk a token attends to itself only when nothing else is allowed
PAD_POSITION = -1  # position given to the keys of windows before the start or after the end of the sequence


def look_around(x: Tensor, backward: int, forward: int, pad_value: float | bool) -> Tensor:
    """Gather each window's attention frame: (B, w, W, ...) -> (B, w, (backward + 1 + forward) * W, ...).

    Frame f of window w holds windows w - backward .. w + forward in order; windows outside the sequence are
    filled with `pad_value`.
    """
    windows = x.shape[1]
    before = x.new_full((x.shape[0], backward, *x.shape[2:]), pad_value)
    after = x.new_full((x.shape[0], forward, *x.shape[2:]), pad_value)
    padded = torch.cat((before, x, after), dim=1)  # (B, backward + w + forward, W, ...)
    frames = [padded[:, offset : offset + windows] for offset in range(backward + 1 + forward)]
    return torch.cat(frames, dim=2)


def pad_to_multiple(x: Tensor, multiple: int, dim: int, value: float | bool = 0) -> Tensor:
    """Pad x along `dim` at the end so its length is a multiple of `multiple`."""
    remainder = -x.shape[dim] % multiple
    if remainder == 0:
        return x
    shape = list(x.shape)
    shape[dim] = remainder
    return torch.cat((x, x.new_full(shape, value)), dim=dim)


def blocked_keys(
    query_positions: Tensor,
    key_positions: Tensor,
    *,
    causal: bool,
    exact_windowsize: bool,
    window_size: int,
    look_backward: int,
    look_forward: int,
) -> Tensor:
    """Which keys a query may not see, from positions alone: (..., i) x (..., j) -> (..., i, j) bool.

    `window_size` here is the model's own window: exact windows are cut at lb * W (and lf * W) positions.
    """
    i = query_positions[..., :, None]
    j = key_positions[..., None, :]
    blocked = j == PAD_POSITION
    if causal:
        blocked = blocked | (j > i)
        if exact_windowsize:
            blocked = blocked | (i > j + window_size * look_backward)
    elif exact_windowsize:
        blocked = blocked | (j - window_size * look_forward > i) | (i > j + window_size * look_backward)
    return blocked


class LocalAttention(nn.Module):
    """Attention of q, k, v (..., n, d) within local windows; same arguments as local-attention 1.11.2."""

    def __init__(
        self,
        window_size: int,
        causal: bool = False,
        look_backward: int = 1,
        look_forward: int | None = None,
        dropout: float = 0.0,
        shared_qk: bool = False,
        rel_pos_emb_config: tuple[int, ...] | None = None,
        dim: int | None = None,
        autopad: bool = False,
        exact_windowsize: bool = False,
        scale: float | None = None,
        use_rotary_pos_emb: bool = True,
        use_xpos: bool = False,
        xpos_scale_base: float | None = None,
    ) -> None:
        super().__init__()
        look_forward = (0 if causal else 1) if look_forward is None else look_forward
        if causal and look_forward > 0:
            raise ValueError("a causal attention cannot look forward")
        if window_size < 1 or look_backward < 0 or look_forward < 0:
            raise ValueError("window_size must be positive and look_backward, look_forward not negative")
        self.window_size = window_size
        self.causal = causal
        self.look_backward = look_backward
        self.look_forward = look_forward
        self.dropout = nn.Dropout(dropout)
        self.shared_qk = shared_qk
        self.autopad = autopad
        self.exact_windowsize = exact_windowsize
        self.scale = scale
        self.use_xpos = use_xpos

        if rel_pos_emb_config is not None:  # the reference's deprecated spelling of `dim`
            dim = rel_pos_emb_config[0]
        self.rel_pos = None
        if use_rotary_pos_emb and dim is not None:
            scale_base = window_size // 2 if xpos_scale_base is None else xpos_scale_base
            self.rel_pos = RotaryEmbedding(dim, use_xpos=use_xpos, scale_base=scale_base)

    def logit_scale(self, dim_head: int) -> float:
        """What q . k is multiplied by: the given scale, else 1 / sqrt(dim_head)."""
        return dim_head**-0.5 if self.scale is None else self.scale

    @property
    def frame_windows(self) -> int:
        """Windows in one query window's frame of keys."""
        return self.look_backward + 1 + self.look_forward

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        input_mask: Tensor | None = None,
        attn_bias: Tensor | None = None,
        window_size: int | None = None,
    ) -> Tensor:
        """q, k, v (..., n, d); mask (batch, n) of keys to keep; attn_bias (heads, W, frame) -> (..., n, d).

        A forward-time `window_size` (windows of another size, xpos models only) changes the buckets; exact
        window cuts and autopadding keep the constructor's window size, as in the reference.
        """
        mask = input_mask if mask is None else mask
        window = self._call_window(window_size)

        (q, packed_shape), (k, _), (v, _) = (pack([t], "* n d") for t in (q, k, v))  # (B, n, d)
        orig_len = q.shape[1]
        if self.autopad:
            q, k, v = (pad_to_multiple(t, self.window_size, dim=1) for t in (q, k, v))
        batch, seq_len, _ = q.shape
        if seq_len % window:
            raise ValueError(f"sequence length {seq_len} must be divisible by window size {window}")

        bq, bk, bv = self._windowed(q, k, v, window)  # (B, w, W, d), (B, w, F, d), (B, w, F, d)
        query_positions = torch.arange(seq_len, device=q.device).view(1, seq_len // window, window)  # (1, w, W)
        key_positions = look_around(query_positions, self.look_backward, self.look_forward, PAD_POSITION)  # (1, w, F)
        sim = self._scores(bq, bk, query_positions, key_positions, attn_bias)  # (B, w, W, F)
        blocked = self._blocked(query_positions, key_positions)  # (1, w, W, F)
        if mask is not None:
            blocked = blocked | ~self._frame_key_mask(mask, batch, window, seq_len)  # (B, w, W, F)

        out = self._attend(sim, blocked, bv)  # (B, w, W, d)
        out = rearrange(out, "b w n d -> b (w n) d")[:, :orig_len]
        (out,) = unpack(out, packed_shape, "* n d")
        return out

    def _call_window(self, window_size: int | None) -> int:
        """The window (bucket) size of one call: the constructor's, or a forward-time one (xpos models only)."""
        if window_size is not None and not self.use_xpos:
            raise ValueError("a forward-time window_size needs xpos (use_xpos=True)")
        return self.window_size if window_size is None else window_size

    def _windowed(self, q: Tensor, k: Tensor, v: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, n, d) -> scaled queries per window (B, w, W, d) and the keys, values of each window's
        frame (B, w, F, d); queries and keys rotated when the attention is rotary."""
        if self.shared_qk:
            k = l2norm(k)
        bq, bk, bv = (rearrange(t, "b (w n) d -> b w n d", n=window) for t in (q, k, v))  # (B, w, W, d)
        bq = bq * self.logit_scale(q.shape[-1])
        bk = look_around(bk, self.look_backward, self.look_forward, PAD_POSITION)  # (B, w, F, d)
        bv = look_around(bv, self.look_backward, self.look_forward, PAD_POSITION)  # (B, w, F, d)
        if self.rel_pos is not None:
            bq, bk = self.rel_pos.rotate_queries_and_keys(bq, bk)
        return bq, bk, bv

    def _scores(
        self,
        bq: Tensor,
        bk: Tensor,
        query_positions: Tensor,
        key_positions: Tensor,
        attn_bias: Tensor | None,
    ) -> Tensor:
        """Logits (B, w, W, F) of each query against its frame's keys, plus the bias (heads, W, F) when given.

        With shared_qk a query's own key gets a low logit, so it is attended only when nothing else is allowed.
        """
        sim = bq @ bk.transpose(-1, -2)  # (B, w, W, F)
        if attn_bias is not None:
            batch, heads = bq.shape[0], attn_bias.shape[0]
            if batch % heads:
                raise ValueError(f"attn_bias has {heads} heads, which do not divide the batch of {batch}")
            sim = sim + repeat(attn_bias, "h i j -> (b h) 1 i j", b=batch // heads)
        if self.shared_qk:
            is_self = query_positions[..., :, None] == key_positions[..., None, :]  # (1, w, W, F)
            sim = sim.masked_fill(is_self, SELF_ATTENTION_LOGIT)
        return sim

    def _blocked(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """Keys hidden from each query by position alone (1, w, W, F); see blocked_keys."""
        return blocked_keys(
            query_positions,
            key_positions,
            causal=self.causal,
            exact_windowsize=self.exact_windowsize,
            window_size=self.window_size,
            look_backward=self.look_backward,
            look_forward=self.look_forward,
        )

    def _frame_key_mask(self, mask: Tensor, batch: int, window: int, seq_len: int) -> Tensor:
        """mask (b, n) of keys to keep -> the kept keys of each window's frame (B, w, 1, F), b dividing B."""
        if batch % mask.shape[0]:
            raise ValueError(f"mask batch {mask.shape[0]} does not divide the attention batch {batch}")
        if self.autopad:
            mask = pad_to_multiple(mask, window, dim=-1, value=False)
        if mask.shape[-1] != seq_len:
            raise ValueError(f"mask covers {mask.shape[-1]} positions, the attention {seq_len}")
        key_mask = rearrange(mask, "... (w n) -> (...) w n", n=window)  # (b, w, W)
        key_mask = look_around(key_mask, self.look_backward, self.look_forward, False)  # (b, w, F)
        return repeat(key_mask, "b w j -> (b h) w 1 j", h=batch // key_mask.shape[0])  # (B, w, 1, F)

    def _attend(self, sim: Tensor, blocked: Tensor, bv: Tensor) -> Tensor:
        """Softmax of the logits (B, w, W, F) over the keys not blocked, dropout, then the values -> (B, w, W, d)."""
        sim = sim.masked_fill(blocked, -torch.finfo(sim.dtype).max)
        attn = self.dropout(sim.softmax(dim=-1))
        return attn @ bv
