"""The Decoder: a model's sliding KV cache over a fixed number of slots, with prompt chunks and batched steps.

It knows token ids and slots only; which slots run, and when a sequence starts or stops, is its caller's
business (the server's runner, or `generate`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.cache import ALL_SLOTS, SlidingKVCache, Slots
from model.compiled_step import CompiledDecode, DecodeGraph
from model.receptive_field import prompt_reach, reading_start
from model.step import CachedLayers, Packing, StepPlanner

if TYPE_CHECKING:
    from model.transformer import LocalTransformer


class NativeKernels:
    """Context in which oneDNN is off, so PyTorch's own CPU kernels run elementwise ops such as GELU.

    For float32 on a CPU: on the few hundred values of a decode step oneDNN's GELU spends several microseconds
    setting up per call, and it rounds differently in the last bit from the native kernel, which is what the
    full forward's GELU over more than one position (non-contiguous halves) runs; float32 matrix products go
    to BLAS either way. (Half-precision matrix products do use oneDNN on a CPU: Decoders in those dtypes leave
    it on.) The switch is process-wide: while any thread is inside, oneDNN is off for every thread; the last
    one out restores it.
    """

    lock = threading.Lock()
    inside = 0
    was_enabled = True

    def __enter__(self) -> None:
        with NativeKernels.lock:
            if NativeKernels.inside == 0:
                NativeKernels.was_enabled = torch.backends.mkldnn.enabled
                torch.backends.mkldnn.enabled = False
            NativeKernels.inside += 1

    def __exit__(self, *exc_info: object) -> None:
        with NativeKernels.lock:
            NativeKernels.inside -= 1
            if NativeKernels.inside == 0:
                torch.backends.mkldnn.enabled = NativeKernels.was_enabled


class Decoder:
    """Runs a causal LocalTransformer over a fixed number of sequence slots with a sliding KV cache."""

    def __init__(
        self,
        model: LocalTransformer,
        num_slots: int,
        *,
        prefill_chunk: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not model.has_embed_unembed:
            raise ValueError("generation needs a model with a token embedding (num_tokens)")
        parameter = next(model.parameters())
        dtype = parameter.dtype if dtype is None else dtype
        device = parameter.device if device is None else torch.device(device)
        self.model = model
        native = device.type == "cpu" and dtype == torch.float32
        self.kernels: AbstractContextManager = NativeKernels() if native else nullcontext()
        self.planner = StepPlanner(model, dtype, device)
        self.layers = CachedLayers(model)
        self.window_size = self.planner.window_size
        chunk = self.window_size if prefill_chunk is None else prefill_chunk
        if chunk < 1 or chunk % self.window_size:
            raise ValueError(f"prefill_chunk must be a positive multiple of the window size {self.window_size}")
        self.prefill_chunk = chunk
        self.reach = prompt_reach(model)  # last prompt tokens the state after a prompt depends on; None: all
        first_attention = model.attention_layers[0]
        self.cache = SlidingKVCache(
            num_layers=len(model.layers),
            num_slots=num_slots,
            heads=first_attention.heads,
            dim_head=first_attention.dim_head,
            capacity=self.planner.capacity,
            device=device,
            dtype=dtype,
        )
        self.compiled: CompiledDecode | None = None  # see compile
        self.compiled_failures = 0  # compiled steps that raised and ran eagerly instead (see decode)
        self.last_compiled_failure = ""

    def compile(self, buckets: Sequence[int] | None = None, progress: Callable[[str], None] | None = None) -> float:
        """Compile the decode step for each batch bucket now (model.compiled_step) -> the seconds it took. From
        then on `decode` over a range of slots runs the compiled step, which holds the weights as they are now.
        """
        graph = DecodeGraph(self.model, self.planner, tuple(self.cache.keys.shape))
        self.compiled = CompiledDecode(graph, self.cache, buckets)
        return self.compiled.warm_up(progress)

    @property
    def context_limit(self) -> int | None:
        """Positions the model can take at most, or None when it has no absolute position embedding."""
        return self.model.max_seq_len if self.model.use_abs_pos_emb else None

    def reset(self, slot: int, start: int = 0) -> None:
        """Begin a new text in `slot` at position `start`: 0, or where the part of a longer text that can still
        matter begins (see read_prompt)."""
        self.cache.reset(slot, start)

    def reading_start(self, prompt_length: int) -> int:
        """The position to start reading a prompt of `prompt_length` tokens from: the tokens before it cannot
        change the logits after the prompt nor any key or value a later step reads (model/receptive_field.py).
        A multiple of the prefill chunk, so the chunks read are those of a whole read."""
        return reading_start(prompt_length, self.reach, self.window_size, self.prefill_chunk)

    def position(self, slot: int) -> int:
        """Tokens the slot has consumed so far."""
        return int(self.cache.lengths[slot])

    def step(self, slots: Slots, tokens: Tensor, advance: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Feed tokens (B, L) to slots (B,) at their current positions -> logits (B, L, num_tokens), or of the
        last position only (B, 1, num_tokens) with `last_only`, all a prompt needs.

        `slots` may be a slice (ALL_SLOTS, or a range of slots): the cache is then read in place, not gathered.
        `advance` (B,) bool marks the slots that really take these tokens; the others ride along in the batch
        and keep their position. Their key is written at their current position's ring index, whose old entry
        is out of every later query's window and which their next real token overwrites: nothing reads it.
        """
        length = tokens.shape[1]
        with torch.inference_mode(), self.kernels:
            hidden = self.hidden_states(slots, tokens, advance)  # (B, L, dim)
            logits = self.layers.logits(hidden[:, -1:] if last_only else hidden)
            self.cache.lengths[slots] += length if advance is None else advance * length  # last: a step that
            return logits  # raised left every position where it was, so running it again is exact

    def hidden_states(self, slots: Slots, tokens: Tensor, advance: Tensor | None = None) -> Tensor:
        """The final hidden states (B, L, dim) of tokens (B, L) fed to slots at their current positions; stores
        their keys and values, and leaves the positions to the caller. `advance` as in `step`."""
        cache = self.cache
        length = tokens.shape[1]
        positions = cache.lengths[slots][:, None].clone()  # (B, 1), not a view of what this step advances
        if length > 1:
            positions = positions + torch.arange(length, device=tokens.device)  # (B, L)
        plan = self.planner.plan(cache, slots, positions)
        if advance is not None:
            positions = positions * advance[:, None]  # riders embed at position 0: always in range
        x = self.model.embed(tokens, positions)  # (B, L, dim); raises ContextLimitError past max_seq_len
        return self.layers.run(x, plan)  # (B, L, dim)

    def chunk_end(self, start: int, end: int) -> int:
        """End of the prefill chunk starting at `start`: the next multiple of the chunk size, at most `end`."""
        return min(end, (start // self.prefill_chunk + 1) * self.prefill_chunk)

    def read_chunk(self, slot: int, tokens: Tensor, all_positions: bool = False) -> Tensor:
        """Feed one prefill chunk of tokens (L,) to `slot` -> logits (num_tokens,) after its last token, or
        with `all_positions` the logits (L, num_tokens) after each of its tokens (to score the prompt)."""
        return self.read_chunks([slot], [tokens], [all_positions])[0]

    def read_chunks(
        self, slots: Sequence[int], chunks: Sequence[Tensor], all_positions: Sequence[bool] | None = None
    ) -> list[Tensor]:
        """Feed prompt chunks (L_b,) to distinct slots in one call -> for each, the logits (num_tokens,) after its
        last token, or (L_b, num_tokens) after each of its tokens where `all_positions` says so.

        The per-token work runs on the chunks end to end, the attention on them padded to the longest (see
        model.step.Packing): one call costs far less than a call per chunk, and padding costs attention only.
        """
        device = self.cache.lengths.device
        index = torch.tensor(slots, device=device)  # (B,)
        lengths = [len(chunk) for chunk in chunks]
        ends = list(itertools.accumulate(lengths))  # each chunk's end in the packed tokens
        every = all_positions or [False] * len(chunks)
        with torch.inference_mode(), self.kernels:
            hidden = self.packed_hidden_states(index, chunks, lengths)  # (1, T, dim)
            logits = self.layers.logits(hidden[:, [end - 1 for end in ends]])[0]  # (B, V)
            read = [
                self.layers.logits(hidden[:, end - length : end])[0] if every[row] else logits[row]
                for row, (length, end) in enumerate(zip(lengths, ends, strict=True))
            ]  # (L_b, V) or (V,) each
            self.cache.lengths[index] += torch.tensor(lengths, device=device)
        return read

    def packed_hidden_states(self, index: Tensor, chunks: Sequence[Tensor], lengths: list[int]) -> Tensor:
        """The final hidden states (1, T, dim) of chunks (L_b,) read into slots `index` (B,) at their positions,
        end to end; stores their keys and values. Chunks of one length run as a plain batch."""
        device = index.device
        if len(set(lengths)) == 1:  # nothing to pad
            return self.hidden_states(index, torch.stack(list(chunks)).to(device)).flatten(0, 1)[None]
        positions = self.cache.lengths[index][:, None] + torch.arange(max(lengths), device=device)  # (B, L)
        packing = Packing.of(lengths, device)
        plan = self.planner.plan(self.cache, index, positions, packing)
        packed_positions = positions.flatten()[packing.packed_from_padded]  # (T,)
        # (1, T, dim); raises ContextLimitError past max_seq_len
        x = self.model.embed(torch.cat(list(chunks)).to(device)[None], packed_positions[None])
        return self.layers.run(x, plan)

    def prefill(self, slot: int, tokens: Sequence[int] | Tensor) -> Tensor:
        """Feed a prompt to one slot chunk by chunk -> logits (num_tokens,) after its last token."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.cache.lengths.device)
        if tokens.numel() == 0:
            raise ValueError("cannot prefill an empty prompt")
        start, logits = 0, None
        while start < tokens.numel():
            position = self.position(slot)
            end = start + self.chunk_end(position, position + tokens.numel() - start) - position
            logits = self.read_chunk(slot, tokens[start:end])
            start = end
        return logits

    def read_prompt(self, slot: int, tokens: Sequence[int] | Tensor) -> Tensor:
        """Begin a new text in `slot` with a prompt, reading only the part of it that can still matter (from
        `reading_start`, at its true positions) -> logits (num_tokens,) after its last token."""
        start = self.reading_start(len(tokens))
        self.reset(slot, start)
        return self.prefill(slot, tokens[start:])

    def decode(self, slots: Slots, tokens: Tensor, advance: Tensor | None = None) -> Tensor:
        """One token (B,) for each of slots (B,) -> next-token logits (B, num_tokens); `advance` as in `step`.

        Once compiled, a range of slots runs the compiled step; where that raises (it would have to compile
        again, or torch's threads changed), the eager step runs instead and `compiled_failures` counts it. A
        compiled step that raises has written nothing or only what the eager step writes again.
        """
        if self.compiled is not None and isinstance(slots, slice):
            try:
                return self.compiled_decode(slots, tokens, advance)
            except Exception as error:  # the eager step is always there; the caller sees the count
                self.compiled_failures += 1
                self.last_compiled_failure = f"{type(error).__name__}: {error}"
        return self.step(slots, tokens[:, None], advance)[:, 0]

    def compiled_decode(self, slots: slice, tokens: Tensor, advance: Tensor | None) -> Tensor:
        """decode on the compiled step: the range padded to its bucket with slots that ride along. Positions past
        max_seq_len are not checked here (see model.compiled_step)."""
        first, stop, _ = slots.indices(self.cache.num_slots)
        bucket = self.compiled.bucket(stop)
        device = tokens.device
        fed = torch.zeros(bucket, dtype=torch.long, device=device)  # (bucket,)
        fed[first:stop] = tokens
        moves = torch.zeros(bucket, dtype=torch.long, device=device)  # (bucket,): 1 where a slot takes its token
        moves[first:stop] = 1 if advance is None else advance
        return self.compiled(fed, moves)[first:stop]  # (B, num_tokens)

    def decode_all(self, tokens: Tensor) -> Tensor:
        """One token for every slot (num_slots,) -> next-token logits (num_slots, num_tokens).

        Slots without a running text decode too (their output is ignored): the step's shapes never change.
        """
        return self.decode(ALL_SLOTS, tokens)
