"""SlidingKVCache: keys and values of the last few positions of every sequence slot, in ring buffers.

A causal query at position t with window W and look_backward lb sees keys from
    t - W * lb           (exact windows)        -> at most W * lb + 1 keys, or
    (t // W - lb) * W    (bucketed windows)     -> at most W * (lb + 1) keys,
up to t itself. So each slot keeps `capacity` = that many positions per layer, and the key of position p lives at
ring index p % capacity: writing position t overwrites position t - capacity, which no query at t or later can
see. Memory per slot is fixed, however long the text.

Worked example, W = 4, lb = 1, exact windows: capacity = 5. After positions 0..6 are written the ring holds

    index      0  1  2  3  4
    position   5  6  2  3  4

and the query at t = 6 sees positions 2..6, all of them. Writing t = 7 replaces position 2 (index 2), which
the query at 7 (seeing 3..7) no longer needs. Before position 4 is written, the ring also holds entries of no
position of this text (p < start), which the attention masks out.

Keys are stored before rotary embedding: rotation angles are computed from positions relative to the current
attention frame at every step, so they stay small and exact at any length.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
from torch import Tensor

Slots = Tensor | slice  # slot indices (B,), or a slice of slots (e.g. every slot), which reads views, not copies
ALL_SLOTS = slice(None)


def cache_capacity(window_size: int, look_backward: int, exact_windowsize: bool) -> int:
    """Positions a causal sliding window can see, the query's own included."""
    if exact_windowsize:
        return window_size * look_backward + 1
    return window_size * (look_backward + 1)


def ring_buffer(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """Zeros of `shape` for the ring buffers; on a Linux CPU, in memory the kernel may back with 2 MiB pages.

    A decode step reads every slot's whole ring, tens of MiB at a few dozen slots: with 4 KiB pages that is
    thousands of TLB misses per step, which huge pages avoid.
    """
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, device=device, dtype=dtype)
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero-filled
    region.madvise(mmap.MADV_HUGEPAGE)
    buffer = torch.frombuffer(region, dtype=dtype, count=count).view(shape)  # the tensor keeps the region alive
    return buffer.zero_()  # touch every page now, not one page fault at a time while serving


class SlidingKVCache:
    """Fixed-size ring buffers of keys and values: (layers, slots, heads, capacity, dim_head) each.

    `lengths[s]` is the next position slot s will write and `starts[s]` the position its text began at: keys
    of positions before the start are never seen. A slot is reused by resetting both.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        heads: int,
        dim_head: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (num_layers, num_slots, heads, capacity, dim_head)
        self._hold(
            ring_buffer(shape, device, dtype).view(-1, dim_head),
            ring_buffer(shape, device, dtype).view(-1, dim_head),
            torch.zeros(num_slots, dtype=torch.long, device=device),
            torch.zeros(num_slots, dtype=torch.long, device=device),
            shape,
        )

    @classmethod
    def over(
        cls, key_rows: Tensor, value_rows: Tensor, lengths: Tensor, starts: Tensor, shape: tuple[int, ...]
    ) -> SlidingKVCache:
        """A cache over existing buffers (key_rows and value_rows as below, lengths and starts (slots,)), shared,
        not copied: how a compiled step, whose inputs are tensors, sees the cache."""
        cache = cls.__new__(cls)
        cache._hold(key_rows, value_rows, lengths, starts, shape)
        return cache

    def _hold(self, key_rows: Tensor, value_rows: Tensor, lengths: Tensor, starts: Tensor, shape: tuple) -> None:
        _, num_slots, heads, capacity, _ = shape  # (layers, slots, heads, capacity, dim_head)
        device = key_rows.device
        self.capacity = capacity
        self.ring_index = torch.arange(capacity, device=device)  # (C,)
        # the row of ring index 0 of each (slot, head) of layer 0 in the flattened buffers (see key_rows)
        self.first_rows = torch.arange(num_slots * heads, device=device).view(num_slots, heads, 1) * capacity
        self.layer_rows = num_slots * heads * capacity  # rows of one layer
        # the buffers with one row per (layer, slot, head, ring index), written by row index: any slots. Being
        # the buffers themselves, not views, lets a compiled step write them in place (inductor copies a
        # buffer whose view is written)
        self.key_rows, self.value_rows = key_rows, value_rows  # (layers * slots * heads * capacity, dim_head)
        self.keys, self.values = key_rows.view(shape), value_rows.view(shape)
        self.lengths, self.starts = lengths, starts

    @property
    def num_slots(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def reset(self, slots: Tensor | list[int] | int, start: int = 0) -> None:
        """Begin new texts in `slots` at position `start`; what the slots held before is never seen again."""
        if start < 0:
            raise ValueError(f"a text cannot start at a negative position ({start})")
        self.lengths[slots] = start
        self.starts[slots] = start

    def ring_positions(self, last_positions: Tensor) -> Tensor:
        """Position held at each ring index (B, capacity) when the newest written position is last (B,).

        Entries that no position has reached yet come out negative.
        """
        last = last_positions[:, None]  # (B, 1)
        return last - (last - self.ring_index) % self.capacity  # (B, C)

    def step_rings(self, slots: Slots, first_position: Tensor, length: int) -> StepRings:
        """Where a step over `slots` reads and writes keys of positions first..first+L-1 (B,): made once per
        step, the same for every layer.

        Only the newest `capacity` positions of a row are kept, so no two writes land on one ring index.
        """
        kept = min(length, self.capacity)
        if length == 1:
            ring = (first_position % self.capacity)[:, None]  # (B, 1)
        else:
            offsets = torch.arange(length - kept, length, device=first_position.device)  # (kept,)
            ring = (first_position[:, None] + offsets) % self.capacity  # (B, kept)
        # rows of the buffers seen as (layers, slots * heads * capacity, dim_head), in (B, heads, kept) order
        rows = (self.first_rows[slots] + ring[:, None, :]).flatten()
        return StepRings(self, slots, rows, skip=length - kept)

    def ragged_rings(self, slots: Slots, first_position: Tensor, length: int, lengths: Tensor) -> StepRings:
        """step_rings for rows of lengths (B,), on the CPU, padded to `length` (the padding is never written):
        the (B, heads, L) entries of the tokens kept, chosen by an index made on the CPU (no device sync)."""
        heads = self.first_rows.shape[1]
        offsets = torch.arange(length)  # (L,)
        kept = (offsets < lengths[:, None]) & (offsets >= lengths[:, None] - self.capacity)  # (B, L)
        kept_index = kept[:, None, :].expand(-1, heads, -1).flatten().nonzero().flatten()  # (entries kept,)
        kept_index = kept_index.to(first_position.device)
        ring = (first_position[:, None] + offsets.to(first_position.device)) % self.capacity  # (B, L)
        rows = (self.first_rows[slots] + ring[:, None, :]).flatten()  # (B * heads * L,)
        return StepRings(self, slots, rows.index_select(0, kept_index), skip=0, kept=kept_index)


@dataclass
class StepRings:
    """The ring entries of one step's slots, and where its new keys and values go: `rows` of the flattened
    buffers for the newest `capacity` of them, after skipping the first `skip`.

    A slice of slots reads views of the buffers; slot indices (B,) read by gathering.
    """

    cache: SlidingKVCache
    slots: Slots
    rows: Tensor  # (B * heads * kept,), of layer 0
    skip: int
    kept: Tensor | None = None  # of the flattened (B, heads, L) new entries, those written (rows of different lengths)

    def read(self, layer: int) -> tuple[Tensor, Tensor]:
        """Keys and values (B, heads, capacity, dim_head) of one layer."""
        return self.cache.keys[layer, self.slots], self.cache.values[layer, self.slots]

    def write(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Store one layer's new keys and values (B, heads, L, dim_head)."""
        dim_head = keys.shape[-1]
        if self.skip:
            keys, values = keys[:, :, self.skip :], values[:, :, self.skip :]  # (B, heads, kept, dim_head)
        if self.kept is not None:
            keys = keys.reshape(-1, dim_head).index_select(0, self.kept)  # (entries kept, dim_head)
            values = values.reshape(-1, dim_head).index_select(0, self.kept)
        # index_put_ into the buffers themselves: a compiled step then writes the cache in place, where with
        # index_copy_, or into a view, inductor would copy the whole cache and copy it back
        rows = self.rows + layer * self.cache.layer_rows
        self.cache.key_rows.index_put_((rows,), keys.reshape(-1, dim_head))
        self.cache.value_rows.index_put_((rows,), values.reshape(-1, dim_head))
