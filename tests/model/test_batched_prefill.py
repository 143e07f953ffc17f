"""Prompt chunks of several slots read in one call (Decoder.read_chunks): what each slot is left with equals
reading its chunks alone, whatever the others' lengths and positions."""

from __future__ import annotations

import pytest
import torch

from model.decoder import Decoder
from model.step import Packing
from tests.model.test_receptive_field import LAYOUTS, TOLERANCE, layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a thread pool only adds waiting

GREEDY_TOKENS = 64


def prompts_of(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (length,), generator=generator) for length in lengths]


def read_together(decoder: Decoder, prompts: list[torch.Tensor], starts: list[int]) -> list[torch.Tensor]:
    """Every prompt into its own slot (prompt i into slot i, from position starts[i]), the next chunk of every
    unfinished prompt in one call per round -> the logits after each prompt, and the batch sizes of the calls."""
    read = [start for start in starts]
    last: list[torch.Tensor | None] = [None] * len(prompts)
    for slot, start in enumerate(starts):
        decoder.reset(slot, start)
    while any(position < len(prompt) for position, prompt in zip(read, prompts, strict=True)):
        slots = [slot for slot, prompt in enumerate(prompts) if read[slot] < len(prompt)]
        ends = [decoder.chunk_end(read[slot], len(prompts[slot])) for slot in slots]
        chunks = [prompts[slot][read[slot] : end] for slot, end in zip(slots, ends, strict=True)]
        for slot, end, logits in zip(slots, ends, decoder.read_chunks(slots, chunks), strict=True):
            read[slot], last[slot] = end, logits
    return last


def read_alone(decoder: Decoder, prompts: list[torch.Tensor], starts: list[int]) -> list[torch.Tensor]:
    last = []
    for slot, (prompt, start) in enumerate(zip(prompts, starts, strict=True)):
        decoder.reset(slot, start)
        last.append(decoder.prefill(slot, prompt[start:]))
    return last


def greedy_from(decoder: Decoder, slot: int, logits: torch.Tensor, count: int) -> list[int]:
    tokens = []
    for _ in range(count):
        token = logits.argmax(-1, keepdim=True)  # (1,)
        tokens.append(int(token))
        logits = decoder.decode(torch.tensor([slot]), token)[0]  # (V,)
    return tokens


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_chunks_read_together_leave_each_slot_as_reading_alone(name: str) -> None:
    """Prompts of lengths that end mid-window, on a window, after one token, and one read from past its start
    (the receptive-field shortcut): the same logits, positions, cached keys and values, and greedy text."""
    net, chunk = layout(name)
    together, alone = Decoder(net, 5, prefill_chunk=chunk), Decoder(net, 5, prefill_chunk=chunk)
    alignment = together.prefill_chunk
    lengths = [3 * alignment + 5, 1, 2 * alignment, alignment - 1, 4 * alignment + 2]
    starts = [0, 0, 0, 0, 2 * alignment]  # the last slot begins mid-text, at a chunk boundary
    prompts = prompts_of(lengths)
    last_together = read_together(together, prompts, starts)
    last_alone = read_alone(alone, prompts, starts)
    assert torch.equal(together.cache.lengths, alone.cache.lengths)
    for slot in range(len(prompts)):
        torch.testing.assert_close(last_together[slot], last_alone[slot], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(together.cache.keys, alone.cache.keys, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(together.cache.values, alone.cache.values, atol=TOLERANCE, rtol=0)
    for slot in range(len(prompts)):
        expected = greedy_from(alone, slot, last_alone[slot], GREEDY_TOKENS)
        assert greedy_from(together, slot, last_together[slot], GREEDY_TOKENS) == expected


def test_a_short_chunk_beside_a_long_one_writes_none_of_its_padding() -> None:
    """A one-token chunk read beside a chunk longer than the ring: the padding after the token (positions the
    slot has not reached) must not be stored, or it would overwrite keys the slot's next query reads. Slots
    outside the call keep every byte."""
    net, chunk = layout("exact-window8-chunk24-abs-pos")  # capacity 9 < chunk 24
    decoder = Decoder(net, 3, prefill_chunk=chunk)
    first, second = prompts_of([23, 24], seed=2)
    decoder.read_chunks([0], [first])  # slot 0 holds positions 0..22
    decoder.read_chunks([2], [prompts_of([5], seed=3)[0]])
    untouched = [decoder.cache.keys[:, 2].clone(), decoder.cache.values[:, 2].clone()]
    expected = Decoder(net, 1, prefill_chunk=chunk)
    expected.read_chunks([0], [first])
    extra = prompts_of([1], seed=4)[0]
    wanted = expected.read_chunks([0], [extra])[0]
    got = decoder.read_chunks([0, 1], [extra, second])[0]
    torch.testing.assert_close(got, wanted, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(decoder.cache.keys[:, 0], expected.cache.keys[:, 0], atol=TOLERANCE, rtol=0)
    assert torch.equal(decoder.cache.keys[:, 2], untouched[0]) and torch.equal(decoder.cache.values[:, 2], untouched[1])
    assert decoder.cache.lengths.tolist() == [24, 24, 5]


def test_scoring_chunks_read_together_give_every_position_as_alone() -> None:
    net, chunk = layout("bucketed-lb2-streams-gates-qknorm")
    together, alone = Decoder(net, 3, prefill_chunk=chunk), Decoder(net, 3, prefill_chunk=chunk)
    chunks = prompts_of([4, 2, 3], seed=5)
    read = together.read_chunks([0, 1, 2], chunks, [True, False, True])
    assert [tuple(logits.shape) for logits in read] == [(4, 64), (64,), (3, 64)]
    for slot, (logits, scores) in enumerate(zip(read, [True, False, True], strict=True)):
        expected = alone.read_chunk(slot, chunks[slot], all_positions=scores)
        torch.testing.assert_close(logits, expected, atol=TOLERANCE, rtol=0)


def test_packing_round_trips_and_pads_with_the_rows_last_token() -> None:
    packing = Packing.of([3, 1, 2], torch.device("cpu"))
    packed = torch.arange(6.0).view(1, 1, 6, 1)  # (1, h, T, dh): rows [0 1 2] [3] [4 5]
    padded = packing.unpack(packed)  # (B, h, L, dh)
    assert padded[:, 0, :, 0].tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 5]]
    assert torch.equal(packing.pack(padded), packed)
