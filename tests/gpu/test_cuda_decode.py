"""The decode path on CUDA: the sliding cache on the device equals the full forward, batched slots equal each
slot alone, half precision stays near float32, weights load to the device in each dtype, and a long prompt read
from its receptive field gives the logits of reading it whole."""

from __future__ import annotations

import pytest
import torch

from model.decoder import Decoder
from model.grammar import GrammarSpec, compile_grammar, masks
from model.sampling import SamplingParams, SequenceSampler, sample_batch
from server.config import BUNDLED_WEIGHTS as BUNDLED_WEIGHTS_FOLDER
from tests.gpu.conftest import DEVICE as CUDA
from tests.model.test_cache import WINDOW, build, layouts
from weights.io import load_checkpoint

HALF_TOLERANCE = {torch.bfloat16: 0.15, torch.float16: 0.03}  # largest logit difference from float32 allowed
LAYOUTS = layouts()[::7]  # a spread of the CPU test's layouts: positions, look-back, exact windows, streams


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda g: "-".join(f"{k}={v}" for k, v in g.items()))
def test_cached_decoding_on_cuda_equals_the_full_forward(layout: dict) -> None:
    net = build(**layout).to(CUDA)
    length = 3 * WINDOW * (layout["look_backward"] + 1) + WINDOW + 1
    tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(3)).to(CUDA)
    with torch.no_grad():
        full = net(tokens)[0]  # (n, V)
    decoder = Decoder(net, num_slots=3)
    assert decoder.cache.keys.device.type == CUDA.type
    slot = torch.tensor([1], device=CUDA)
    for position in range(length):
        logits = decoder.decode(slot, tokens[:, position])[0]
        assert (logits - full[position]).abs().max() <= 1e-4, f"position {position}"


def test_batched_slots_on_cuda_equal_each_slot_alone() -> None:
    net = build(look_backward=2).to(CUDA)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (length,), generator=generator).to(CUDA) for length in (3, 9, 17, 30)]
    together = Decoder(net, num_slots=len(prompts))
    alone = [Decoder(net, num_slots=1) for _ in prompts]
    for slot, prompt in enumerate(prompts):
        assert torch.allclose(together.prefill(slot, prompt), alone[slot].prefill(0, prompt), atol=1e-4)
    feed = torch.randint(0, 256, (12, len(prompts)), generator=generator).to(CUDA)
    for step in feed:
        batched = together.decode_all(step)  # (B, V)
        for slot, decoder in enumerate(alone):
            one = decoder.decode(torch.tensor([0], device=CUDA), step[slot : slot + 1])[0]
            assert (batched[slot] - one).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_stays_near_float32_and_greedy_text_agrees_where_the_margin_is_large(dtype) -> None:
    reference, _ = load_checkpoint(BUNDLED_WEIGHTS_FOLDER, device=CUDA)
    half, _ = load_checkpoint(BUNDLED_WEIGHTS_FOLDER, device=CUDA, dtype=dtype)
    prompt = torch.tensor(list(b"ROMEO: What light through yonder window breaks?\nJULIET:"), device=CUDA)
    exact, rounded = Decoder(reference, num_slots=1), Decoder(half, num_slots=1)
    logits32, logits16 = exact.prefill(0, prompt), rounded.prefill(0, prompt).float()
    slot = torch.tensor([0], device=CUDA)
    for _ in range(32):
        assert (logits16 - logits32).abs().max() <= HALF_TOLERANCE[dtype]
        top2 = logits32.topk(2).values
        if top2[0] - top2[1] <= 2 * HALF_TOLERANCE[dtype]:
            break  # a near tie: the two precisions may part here, and the texts with them
        token = logits32.argmax()
        assert logits16.argmax() == token
        logits32 = exact.decode(slot, token[None])[0]
        logits16 = rounded.decode(slot, token[None])[0].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_weights_load_to_the_device_in_each_dtype(dtype) -> None:
    net, _ = load_checkpoint(BUNDLED_WEIGHTS_FOLDER, device=CUDA, dtype=dtype)
    parameters = list(net.parameters())
    assert all(p.device.type == CUDA.type and p.dtype == dtype for p in parameters)
    decoder = Decoder(net, num_slots=2)
    assert decoder.cache.keys.dtype == dtype and decoder.cache.keys.device.type == CUDA.type
    logits = decoder.prefill(0, torch.tensor(list(b"To be"), device=CUDA))
    assert logits.isfinite().all()


def test_a_long_prompt_read_from_its_receptive_field_gives_the_whole_reads_logits() -> None:
    net, _ = load_checkpoint(BUNDLED_WEIGHTS_FOLDER, device=CUDA)
    prompt = torch.randint(32, 127, (3000,), generator=torch.Generator().manual_seed(9)).to(CUDA)
    reading = Decoder(net, num_slots=1)
    whole = Decoder(net, num_slots=1)
    assert reading.reading_start(len(prompt)) > 0
    assert (reading.read_prompt(0, prompt) - whole.prefill(0, prompt)).abs().max() <= 1e-4


def test_constrained_sampling_on_cuda_takes_only_what_the_grammar_allows() -> None:
    matcher = compile_grammar(GrammarSpec("regex", "[0-9]{3}")).matcher()
    sampler = SequenceSampler(SamplingParams(temperature=1.0, seed=3), 256, device=CUDA)
    text = b""
    for _ in range(3):
        logits = torch.randn(1, 256, device=CUDA)
        token = int(sample_batch(logits, [sampler], masks([matcher], CUDA)).tokens[0])
        matcher.consume(token)
        text += bytes([token])
    assert text.isdigit() and matcher.complete


def test_the_captured_decode_step_equals_eager() -> None:
    """Decoder.compile on CUDA: the step captured as CUDA graphs per bucket, replayed, gives the eager logits
    and positions, a step over fewer slots padded to its bucket with riders."""
    net = build(look_backward=2).to(CUDA)
    generator = torch.Generator().manual_seed(9)
    eager, captured = Decoder(net, num_slots=4), Decoder(net, num_slots=4)
    for slot, length in enumerate((3, 9, 17, 30)):
        prompt = torch.randint(0, 256, (length,), generator=generator).to(CUDA)
        eager.prefill(slot, prompt)
        captured.prefill(slot, prompt)
    captured.compile(buckets=[1, 2, 4])
    for first, stop in [(0, 4), (0, 1), (1, 3), (0, 4), (2, 4)] * 4:
        tokens = torch.randint(0, 256, (stop - first,), generator=generator).to(CUDA)
        expected = eager.decode(slice(first, stop), tokens)
        got = captured.decode(slice(first, stop), tokens)
        assert (got - expected).abs().max() <= 1e-4
        assert torch.equal(captured.cache.lengths, eager.cache.lengths)
