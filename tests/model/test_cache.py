"""Cached decoding against the full forward: exact over every window boundary, in every supported layout."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

import model
from model.cache import SlidingKVCache, cache_capacity, ring_buffer
from model.decoder import Decoder, NativeKernels
from model.positions import ContextLimitError
from model.step import CPU_BATCHED_DECODE_ROWS
from tests.model.helpers import randomize_

TOLERANCE = 1e-4
WINDOW = 4


def build(seed: int = 0, **kwargs) -> model.LocalTransformer:
    torch.manual_seed(seed)
    options = dict(num_tokens=256, max_seq_len=512, dim=32, depth=2, heads=2, dim_head=8)
    options.update(local_attn_window_size=WINDOW, **kwargs)
    return randomize_(model.LocalTransformer(**options), seed).eval()


def layouts() -> list[dict]:
    found = []
    for positions, look_backward, exact, shared_qk, qk_rmsnorm, gates, streams in itertools.product(
        ("rotary", "xpos", "dynamic_bias"), (1, 2), (True, False), (False, True), (False, True), (False, True), (1, 4)
    ):
        if positions == "dynamic_bias" and look_backward != 1:
            continue
        found.append(
            dict(
                use_xpos=positions == "xpos",
                use_dynamic_pos_bias=positions == "dynamic_bias",
                look_backward=look_backward,
                exact_windowsize=exact,
                shared_qk=shared_qk,
                qk_rmsnorm=qk_rmsnorm,
                gate_values_per_head=gates,
                num_residual_streams=streams,
            )
        )
    return found


@pytest.mark.parametrize("layout", layouts(), ids=lambda g: "-".join(f"{k}={v}" for k, v in g.items()))
def test_cached_decoding_equals_full_forward(layout: dict) -> None:
    net = build(**layout)
    length = 3 * WINDOW * (layout["look_backward"] + 1) + WINDOW + 1  # crosses every boundary case
    tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = net(tokens)[0]  # (n, V)

    decoder = Decoder(net, num_slots=3)
    slot = torch.tensor([1])
    for position in range(length):
        logits = decoder.decode(slot, tokens[:, position])[0]
        assert (logits - full[position]).abs().max() <= TOLERANCE, f"position {position}"

    chunked = Decoder(net, num_slots=1, prefill_chunk=2 * WINDOW)
    prompt = 2 * WINDOW + 3
    assert (chunked.prefill(0, tokens[0, :prompt]) - full[prompt - 1]).abs().max() <= TOLERANCE
    for position in range(prompt, length):
        logits = chunked.decode(torch.tensor([0]), tokens[:, position])[0]
        assert (logits - full[position]).abs().max() <= TOLERANCE, f"position {position} after prefill"


@pytest.mark.parametrize("chunk", [WINDOW, 3 * WINDOW])
def test_chunked_prefill_equals_full_forward_at_every_length(chunk: int) -> None:
    net = build(look_backward=2, exact_windowsize=False)
    tokens = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = net(tokens[None])[0]
    for length in range(1, 40, 3):
        decoder = Decoder(net, num_slots=1, prefill_chunk=chunk)
        assert (decoder.prefill(0, tokens[:length]) - full[length - 1]).abs().max() <= TOLERANCE


# 16 slots x 2 heads reach the batched-matrix-product attention of CPU decode steps; 4 slots stay below it
@pytest.mark.parametrize("positions", ["rotary", "dynamic_bias"])
@pytest.mark.parametrize("num_slots", [4, 16])
def test_batched_slots_equal_each_slot_alone_and_survive_reuse(num_slots: int, positions: str) -> None:
    net = build(seed=1, use_dynamic_pos_bias=positions == "dynamic_bias")
    assert (num_slots * 2 >= CPU_BATCHED_DECODE_ROWS) == (num_slots == 16)
    generator = torch.Generator().manual_seed(7)
    texts = [torch.randint(0, 256, (80,), generator=generator) for _ in range(num_slots + 1)]
    with torch.no_grad():
        expected = [net(text[None])[0] for text in texts]

    decoder = Decoder(net, num_slots=num_slots)
    positions = {}
    for slot in range(num_slots):
        length = 1 + (5 * slot) % 14  # every slot at another place in its window
        decoder.prefill(slot, texts[slot][:length])
        positions[slot] = length
    owner = {slot: slot for slot in range(num_slots)}

    for step in range(40):
        if step == 17:  # slot 2 finishes; a new text takes its place without disturbing the others
            decoder.reset(2)
            owner[2] = num_slots
            decoder.prefill(2, texts[num_slots][:3])
            positions[2] = 3
        tokens = torch.stack([texts[owner[slot]][positions[slot]] for slot in range(num_slots)])
        logits = decoder.decode_all(tokens) if step % 2 else decoder.decode(torch.arange(num_slots), tokens)
        for slot in range(num_slots):
            reference = expected[owner[slot]][positions[slot]]
            assert (logits[slot] - reference).abs().max() <= TOLERANCE, f"slot {slot} step {step}"
            positions[slot] += 1


def test_decoding_a_subset_of_slots_leaves_the_others_untouched() -> None:
    net = build(seed=2)
    decoder = Decoder(net, num_slots=3)
    decoder.prefill(0, [1, 2, 3])
    decoder.prefill(2, [4, 5, 6, 7])
    keys_before = decoder.cache.keys[:, 2].clone()
    decoder.decode(torch.tensor([0]), torch.tensor([9]))
    assert torch.equal(decoder.cache.keys[:, 2], keys_before)
    assert decoder.position(0) == 4 and decoder.position(2) == 4


def test_relative_model_gives_the_same_logits_at_position_ten_million() -> None:
    net = build(use_abs_pos_emb=False, look_backward=2)
    tokens = torch.randint(0, 256, (1, 3 * WINDOW * 3), generator=torch.Generator().manual_seed(11))
    far = 10_000_000  # a window boundary
    assert far % WINDOW == 0
    decoder = Decoder(net, num_slots=2)
    decoder.reset(1, start=far)
    for position in range(tokens.shape[1]):
        logits = decoder.decode(torch.tensor([0, 1]), torch.cat((tokens[:, position], tokens[:, position])))
        assert (logits[0] - logits[1]).abs().max() <= 1e-5, f"position {position}"
    assert decoder.position(1) == far + tokens.shape[1]


def test_absolute_position_model_stops_at_max_seq_len() -> None:
    net = build(max_seq_len=12)
    decoder = Decoder(net, num_slots=1)
    decoder.prefill(0, list(range(12)))
    with pytest.raises(ContextLimitError, match="max_seq_len 12"):
        decoder.decode(torch.tensor([0]), torch.tensor([1]))
    assert decoder.context_limit == 12
    assert Decoder(build(use_abs_pos_emb=False), num_slots=1).context_limit is None


def test_cache_memory_is_allocated_once_and_bounded_by_the_window() -> None:
    net = build(look_backward=2, exact_windowsize=True)
    decoder = Decoder(net, num_slots=2)
    cache = decoder.cache
    assert cache.capacity == cache_capacity(WINDOW, 2, True) == 2 * WINDOW + 1
    assert cache_capacity(WINDOW, 2, False) == 3 * WINDOW
    pointer, shape = cache.keys.data_ptr(), cache.keys.shape
    decoder.prefill(0, torch.randint(0, 256, (100,)))
    for _ in range(200):
        decoder.decode(torch.tensor([0, 1]), torch.tensor([3, 4]))
    assert cache.keys.data_ptr() == pointer and cache.keys.shape == shape
    assert shape == (2, 2, 2, 2 * WINDOW + 1, 8)


def test_ring_positions_follow_the_worked_example() -> None:
    cache = SlidingKVCache(num_layers=1, num_slots=1, heads=1, dim_head=1, capacity=5)
    assert cache.ring_positions(torch.tensor([6])).tolist() == [[5, 6, 2, 3, 4]]
    assert cache.ring_positions(torch.tensor([1])).tolist() == [[0, 1, -3, -2, -1]]


def test_models_that_cannot_use_the_cache_are_refused() -> None:
    with pytest.raises(ValueError, match="causal"):
        Decoder(build(causal=False), num_slots=1)
    with pytest.raises(ValueError, match="global"):
        Decoder(build(global_attn_layer=torch.nn.Identity()), num_slots=1)
    with pytest.raises(ValueError, match="multiple of the window"):
        Decoder(build(), num_slots=1, prefill_chunk=WINDOW + 1)


def test_generate_keeps_the_reference_signature_and_matches_uncached() -> None:
    net = build(seed=4)
    prime = torch.randint(0, 256, (2, 7))
    greedy = net.generate(prime, 30, temperature=0.0)
    assert greedy.shape == (2, 30)
    assert torch.equal(greedy, net.generate(prime, 30, temperature=0.0, use_kv_cache=False))
    sampled = net.generate(prime, 30, temperature=1.0, filter_thres=0.9, seed=5)
    assert torch.equal(sampled, net.generate(prime, 30, filter_thres=0.9, use_kv_cache=False, seed=5))


MILLION_BYTE_PROMPT = """
import resource, torch
import model
from model.decoder import Decoder
torch.set_num_threads(1)
net = model.LocalTransformer(num_tokens=256, max_seq_len=1, dim=16, depth=1, heads=1, dim_head=16,
                             local_attn_window_size=64, use_abs_pos_emb=False).eval()
decoder = Decoder(net, num_slots=1, prefill_chunk=256)
prompt = torch.randint(0, 256, (1_000_000,))
decoder.prefill(0, prompt[:40_000])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoder.reset(0)
logits = decoder.prefill(0, prompt)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(logits).all() and decoder.position(0) == 1_000_000
print((after - before) * 1024)
"""


@pytest.mark.slow
def test_million_token_prompt_prefills_in_bounded_memory() -> None:
    result = subprocess.run(
        [sys.executable, "-c", MILLION_BYTE_PROMPT], capture_output=True, text=True, timeout=600, check=True
    )
    growth = int(result.stdout.split()[-1])
    assert growth < 64 * 2**20, f"prefilling 1,000,000 tokens grew the process by {growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("exact", [True, False])
def test_slots_riding_along_without_advancing_are_not_disturbed(exact: bool) -> None:
    net = build(seed=6, exact_windowsize=exact, look_backward=2)
    generator = torch.Generator().manual_seed(8)
    decoding, reading = (
        torch.randint(0, 256, (60,), generator=generator),
        torch.randint(0, 256, (60,), generator=generator),
    )
    with torch.no_grad():
        expected_decoding, expected_reading = net(decoding[None])[0], net(reading[None])[0]
    decoder = Decoder(net, num_slots=3, prefill_chunk=WINDOW)
    decoder.prefill(0, decoding[:5])
    advance = torch.tensor([True, False, False])  # slot 1 reads a prompt chunk by chunk; slot 2 is free
    read = 0
    for position in range(5, 45):
        if read < 40:  # one prompt chunk for slot 1 between decode steps
            end = decoder.chunk_end(read, 40)
            decoder.step(torch.tensor([1]), reading[None, read:end])
            read = end
        tokens = torch.stack((decoding[position], torch.tensor(0), torch.tensor(0)))
        logits = decoder.decode(slice(0, 3), tokens, advance)
        assert (logits[0] - expected_decoding[position]).abs().max() <= TOLERANCE
    assert decoder.position(1) == 40 and decoder.position(2) == 0
    logits = decoder.decode(torch.tensor([1]), reading[40:41])[0]
    assert (logits - expected_reading[40]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("num_slots", [1, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("positions", ["rotary", "xpos", "dynamic_bias"])
def test_half_precision_decoding_follows_float32(dtype: torch.dtype, positions: str, num_slots: int) -> None:
    options = dict(use_xpos=positions == "xpos", use_dynamic_pos_bias=positions == "dynamic_bias")
    net = build(seed=9, **options)
    half = build(seed=9, **options).to(dtype)
    for module in half.modules():  # rotary frequencies stay float32, as load_checkpoint keeps them
        if hasattr(module, "inv_freq"):
            module.inv_freq = module.inv_freq.float()
    tokens = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(2))
    exact, approximate = Decoder(net, num_slots=num_slots), Decoder(half, num_slots=num_slots)
    assert approximate.cache.keys.dtype == dtype
    for token in tokens:
        expected = exact.decode_all(token.repeat(num_slots)).softmax(-1)  # (slots, V)
        actual = approximate.decode_all(token.repeat(num_slots)).float().softmax(-1)
        assert torch.isfinite(actual).all()
        assert (expected - actual).abs().max() < 0.05


def test_native_kernels_switch_oneDNN_off_while_inside_and_nest() -> None:
    before = torch.backends.mkldnn.enabled
    with NativeKernels():
        assert not torch.backends.mkldnn.enabled
        with NativeKernels():
            assert not torch.backends.mkldnn.enabled
        assert not torch.backends.mkldnn.enabled  # the outer one is still inside
    assert torch.backends.mkldnn.enabled == before
    # half-precision matrix products use oneDNN on a CPU: only float32 decoders turn it off
    assert isinstance(Decoder(build(), num_slots=1).kernels, NativeKernels)
    assert not isinstance(Decoder(build().to(torch.bfloat16), num_slots=1).kernels, NativeKernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_buffers_start_zeroed_contiguous_and_writable(dtype: torch.dtype) -> None:
    shape = (2, 3, 4, 5, 6)
    buffer = ring_buffer(shape, "cpu", dtype)
    assert buffer.shape == shape and buffer.dtype == dtype and buffer.is_contiguous()
    assert not buffer.any()
    buffer[1, 2] = 3.0
    assert buffer.sum().item() == 3.0 * 4 * 5 * 6
