"""Reading only a prompt's receptive field: the same logits, cache and greedy text as reading all of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import model
from model.decoder import Decoder
from model.receptive_field import prompt_reach, reading_start
from tests.model.helpers import randomize_

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a thread pool only adds waiting

TOLERANCE = 1e-5
GREEDY_TOKENS = 64

# A representative grid: both window kinds at look-backs 1 and 2, every position encoding, the per-token
# options (streams, gates, qk norm, shared qk), absolute positions, depth 3 and a chunk of several windows.
LAYOUTS = {
    "exact-lb1": dict(exact_windowsize=True),
    "bucketed-lb1": dict(exact_windowsize=False),
    "exact-lb2-xpos": dict(exact_windowsize=True, look_backward=2, use_xpos=True),
    "bucketed-lb2-streams-gates-qknorm": dict(
        exact_windowsize=False, look_backward=2, num_residual_streams=4, gate_values_per_head=True, qk_rmsnorm=True
    ),
    "bucketed-dynamic-bias-shared-qk": dict(exact_windowsize=False, use_dynamic_pos_bias=True, shared_qk=True),
    "exact-abs-pos-streams": dict(exact_windowsize=True, use_abs_pos_emb=True, num_residual_streams=2),
    "bucketed-depth3-window8-chunk16": dict(exact_windowsize=False, depth=3, local_attn_window_size=8, chunk=16),
    "exact-window8-chunk24-abs-pos": dict(exact_windowsize=True, local_attn_window_size=8, chunk=24),
}


def build(seed: int = 0, **options) -> model.LocalTransformer:
    torch.manual_seed(seed)
    kwargs = dict(num_tokens=64, max_seq_len=512, dim=16, depth=2, heads=2, dim_head=8, local_attn_window_size=4)
    kwargs.update(use_abs_pos_emb=False)
    kwargs.update(options)
    net = randomize_(model.LocalTransformer(**kwargs), seed).eval()
    with torch.no_grad():
        net.to_logits[1].weight.mul_(4)  # peaked logits: greedy choices far from ties
    return net


def layout(name: str) -> tuple[model.LocalTransformer, int | None]:
    options = dict(LAYOUTS[name])
    chunk = options.pop("chunk", None)
    return build(**options), chunk


def prompt_lengths(reach: int, window: int, alignment: int) -> list[int]:
    """R - 1, R, R + 1, 3R + 17, one that is no multiple of the window, and one where reading one token fewer
    than R would move the start (n - R + 1 a multiple of the alignment)."""
    odd = 2 * reach + 1 if (2 * reach + 1) % window else 2 * reach + 2
    return [reach - 1, reach, reach + 1, 3 * reach + 17, odd, reach + 3 * alignment - 1]


def visible_positions(decoder: Decoder, length: int) -> list[int]:
    """Positions whose keys and values the next query (at `length`) reads."""
    planner = decoder.planner
    window, look_backward = planner.window_size, planner.look_backward
    lowest = (
        length - window * look_backward if planner.exact_windowsize else (length // window - look_backward) * window
    )
    return list(range(max(lowest, 0), length))


def assert_same_state(whole: Decoder, short: Decoder, length: int) -> None:
    """Every cached key and value the next step reads, in every layer, as reading the whole prompt left them."""
    ring = [position % whole.cache.capacity for position in visible_positions(whole, length)]
    for name in ("keys", "values"):
        expected = getattr(whole.cache, name)[:, 0, :, ring]  # (layers, heads, visible, dim_head)
        actual = getattr(short.cache, name)[:, 0, :, ring]
        torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


def greedy(decoder: Decoder, logits: torch.Tensor, count: int) -> tuple[list[int], list[torch.Tensor]]:
    """`count` greedy tokens from slot 0 after logits (V,) -> the tokens and the logits they came from."""
    tokens, seen = [], [logits]
    for _ in range(count):
        token = logits.argmax(-1, keepdim=True)  # (1,)
        tokens.append(int(token))
        logits = decoder.decode(torch.tensor([0]), token)[0]  # (V,)
        seen.append(logits)
    return tokens, seen


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_reading_the_receptive_field_equals_reading_everything(name: str) -> None:
    net, chunk = layout(name)
    attention = net.attention_layers[0].attn_fn
    reach = len(net.layers) * attention.window_size * attention.look_backward + 1  # derived here, independently
    assert prompt_reach(net) == reach
    probe = Decoder(net, num_slots=1, prefill_chunk=chunk)
    generator = torch.Generator().manual_seed(1)
    for length in prompt_lengths(reach, probe.window_size, probe.prefill_chunk):
        prompt = torch.randint(0, 64, (length,), generator=generator)
        whole, short = Decoder(net, num_slots=1, prefill_chunk=chunk), Decoder(net, num_slots=1, prefill_chunk=chunk)
        expected = whole.prefill(0, prompt)  # (V,), read from position 0
        actual = short.read_prompt(0, prompt)
        start = short.reading_start(length)
        assert start == reading_start(length, prompt_reach(net), probe.window_size, probe.prefill_chunk)
        assert short.position(0) == length and int(short.cache.starts[0]) == start
        torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0, msg=f"length {length}")
        assert_same_state(whole, short, length)
        want, want_logits = greedy(whole, expected, GREEDY_TOKENS)
        got, got_logits = greedy(short, actual, GREEDY_TOKENS)
        assert got == want, f"length {length}"
        torch.testing.assert_close(torch.stack(got_logits), torch.stack(want_logits), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", ["exact-lb1", "bucketed-lb1", "exact-lb2-xpos", "bucketed-depth3-window8-chunk16"])
def test_the_reach_is_tight_one_window_later_changes_the_logits(name: str) -> None:
    """Starting one position later (exact windows) or one window later (bucketed) than n - R loses a token the
    logits depend on: R is the least reach, not just a safe one."""
    net, chunk = layout(name)
    reach = prompt_reach(net)
    probe = Decoder(net, num_slots=1, prefill_chunk=chunk)
    length = reach + 3 * probe.prefill_chunk  # n - R is a multiple of the chunk: the start is n - R itself
    prompt = torch.randint(0, 64, (length,), generator=torch.Generator().manual_seed(2))
    assert probe.reading_start(length) == length - reach
    later = length - reach + (1 if net.attention_layers[0].attn_fn.exact_windowsize else probe.window_size)
    expected = probe.prefill(0, prompt)
    probe.reset(0, later)
    assert (probe.prefill(0, prompt[later:]) - expected).abs().max() > 1e-3


def test_generate_reads_only_the_receptive_field_with_the_same_text(monkeypatch: pytest.MonkeyPatch) -> None:
    net, _ = layout("bucketed-lb1")
    reach = prompt_reach(net)
    prime = torch.randint(0, 64, (2, 3 * reach + 17), generator=torch.Generator().manual_seed(3))
    starts = []
    reset = Decoder.reset
    monkeypatch.setattr(Decoder, "reset", lambda self, slot, start=0: starts.append(start) or reset(self, slot, start))
    text = net.generate(prime, 32, temperature=0.0)
    assert starts == [reading_start(3 * reach + 17, reach, 4, 4)] * 2 and starts[0] > 0
    for row in range(2):
        decoder = Decoder(net, num_slots=1)
        tokens, _ = greedy(decoder, decoder.prefill(0, prime[row]), 32)  # read from position 0
        assert text[row].tolist() == tokens


def test_unbounded_reach_reads_everything() -> None:
    """A global attention layer (or a model that is not causal) has no bound: the start is always 0."""
    with_global = build(global_attn_layer=nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)))
    assert prompt_reach(with_global) is None
    assert prompt_reach(build(causal=False)) is None
    assert reading_start(10_000, None, 4, 4) == 0


def test_reading_start_follows_the_worked_example() -> None:
    """The docstring's W = 4, lb = 1, L = 2: R = 9; prompts of 30 and 28 tokens start at 20 and 16."""
    assert prompt_reach(build(exact_windowsize=False)) == prompt_reach(build(exact_windowsize=True)) == 9
    assert reading_start(30, 9, 4, 4) == 20
    assert reading_start(28, 9, 4, 4) == 16
    assert reading_start(30, 9, 4, 8) == 16  # chunks of 8: the start is a multiple of the chunk
    assert reading_start(9, 9, 4, 4) == reading_start(5, 9, 4, 4) == 0
