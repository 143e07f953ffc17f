"""LocalAttention on raw q, k, v against local-attention 1.11.2, and its masking rule against a dense mask."""

from __future__ import annotations

import itertools

import local_attention
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import model

TOLERANCE = 1e-5
WINDOW = 4
DIM_HEAD = 8


def layouts() -> list[dict]:
    found = []
    for causal, look_backward, look_forward, exact, shared_qk, positions in itertools.product(
        (True, False), (0, 1, 2), (0, 1, 2), (True, False), (False, True), ("rotary", "xpos", "none")
    ):
        if causal and look_forward:
            continue
        found.append(
            dict(
                causal=causal,
                look_backward=look_backward,
                look_forward=look_forward,
                exact_windowsize=exact,
                shared_qk=shared_qk,
                use_rotary_pos_emb=positions != "none",
                use_xpos=positions == "xpos",
            )
        )
    return found


def pair(**kwargs) -> tuple[torch.nn.Module, model.LocalAttention]:
    reference = local_attention.LocalAttention(window_size=WINDOW, dim=DIM_HEAD, **kwargs).eval()
    ours = model.LocalAttention(window_size=WINDOW, dim=DIM_HEAD, **kwargs).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def assert_same(reference, ours, *args, **kwargs) -> None:
    expected, actual = reference(*args, **kwargs), ours(*args, **kwargs)
    assert actual.shape == expected.shape
    assert (expected - actual).abs().max() <= TOLERANCE


@pytest.mark.parametrize("layout", layouts(), ids=lambda g: "-".join(f"{k}={v}" for k, v in g.items()))
def test_attention_matches_reference(layout: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, heads, frame = 2, 2, (layout["look_backward"] + 1 + layout["look_forward"]) * WINDOW
    q, k, v = torch.randn(3, batch, heads, 5 * WINDOW, DIM_HEAD, generator=generator)
    mask = torch.rand(batch, 5 * WINDOW, generator=generator) > 0.3
    bias = torch.randn(heads, WINDOW, frame, generator=generator)
    with torch.no_grad():
        reference, ours = pair(**layout)
        assert_same(reference, ours, q, k, v)
        assert_same(reference, ours, q, k, v, mask=mask)
        assert_same(reference, ours, q[0], k[0], v[0], input_mask=mask[:1])  # (h, n, d) with one mask row
        assert_same(reference, ours, q, k, v, mask=mask, attn_bias=bias)

        reference, ours = pair(**layout, autopad=True, scale=0.5)
        length = 4 * WINDOW + 3  # not a multiple of the window
        assert_same(reference, ours, q[..., :length, :], k[..., :length, :], v[..., :length, :])
        assert_same(reference, ours, q[..., :length, :], k[..., :length, :], v[..., :length, :], mask=mask[:, :length])


def test_forward_time_window_size_with_xpos() -> None:
    q, k, v = torch.randn(3, 2, 6 * WINDOW, DIM_HEAD)
    for causal in (True, False):
        reference, ours = pair(causal=causal, use_xpos=True, exact_windowsize=True)
        with torch.no_grad():
            assert_same(reference, ours, q, k, v, window_size=2 * WINDOW)
            assert_same(reference, ours, q, k, v, window_size=WINDOW // 2)


def test_forward_time_window_size_needs_xpos() -> None:
    _, ours = pair(causal=True)
    q = torch.randn(1, 2 * WINDOW, DIM_HEAD)
    with pytest.raises(ValueError, match="xpos"):
        ours(q, q, q, window_size=2 * WINDOW)


def test_length_must_fit_windows_without_autopad() -> None:
    _, ours = pair(causal=True)
    q = torch.randn(1, WINDOW + 1, DIM_HEAD)
    with pytest.raises(ValueError, match="divisible"):
        ours(q, q, q)


def test_fully_masked_rows_give_no_nan() -> None:
    _, ours = pair(causal=False, exact_windowsize=True)
    q, k, v = torch.randn(3, 2, 3 * WINDOW, DIM_HEAD)
    out = ours(q, k, v, mask=torch.zeros(2, 3 * WINDOW, dtype=torch.bool))
    assert torch.isfinite(out).all()


def dense_allowed(
    n: int, window: int, causal: bool, exact: bool, look_backward: int, look_forward: int
) -> torch.Tensor:
    """Which key j each query i may see, written from the rule itself over all n x n pairs."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    query_window, key_window = i // window, j // window
    allowed = (key_window >= query_window - look_backward) & (key_window <= query_window + look_forward)
    if causal:
        allowed &= j <= i
    if exact:
        allowed &= j >= i - window * look_backward
        if not causal:
            allowed &= j <= i + window * look_forward
    return allowed


@settings(max_examples=60, deadline=None)
@given(
    windows=st.integers(1, 5),
    window=st.integers(1, 5),
    causal=st.booleans(),
    exact=st.booleans(),
    look_backward=st.integers(0, 2),
    look_forward=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_masking_rule_equals_dense_attention(windows, window, causal, exact, look_backward, look_forward, seed) -> None:
    if causal:
        look_forward = 0
    n = windows * window
    attention = model.LocalAttention(
        window_size=window,
        causal=causal,
        look_backward=look_backward,
        look_forward=look_forward,
        exact_windowsize=exact,
        use_rotary_pos_emb=False,
    )
    generator = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, 2, n, 4, generator=generator, dtype=torch.float64)
    allowed = dense_allowed(n, window, causal, exact, look_backward, look_forward)  # (n, n)
    scores = (q @ k.transpose(-1, -2)) * 4**-0.5
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v
    actual = attention(q, k, v)
    rows = allowed.any(dim=-1)  # rows with no allowed key are defined by the reference, not by the rule
    assert torch.allclose(actual[:, rows], expected[:, rows], atol=1e-9)
