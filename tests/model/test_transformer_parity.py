"""LocalTransformer against local-attention 1.11.2: same state dict, same logits over a grid of options."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import model
from tests.model.helpers import reference_and_ours

TOLERANCE = 1e-5
WINDOW = 8


def geometries() -> list[dict]:
    """Every window layout and position encoding the reference supports."""
    found = []
    for causal, look_backward, look_forward, exact, shared_qk, positions in itertools.product(
        (True, False), (1, 2), (0, 1), (True, False), (False, True), ("rotary", "xpos", "dynamic_bias")
    ):
        if causal and look_forward:
            continue
        if positions == "dynamic_bias" and look_backward + look_forward != 1:
            continue  # the dynamic bias spans exactly two windows
        found.append(
            dict(
                causal=causal,
                look_backward=look_backward,
                look_forward=look_forward,
                exact_windowsize=exact,
                shared_qk=shared_qk,
                use_xpos=positions == "xpos",
                use_dynamic_pos_bias=positions == "dynamic_bias",
            )
        )
    return found


BLOCKS = [
    dict(
        qk_rmsnorm=qk_rmsnorm,
        gate_values_per_head=gates,
        num_residual_streams=streams,
        global_layers=global_layers,
    )
    for qk_rmsnorm, gates, streams, global_layers in itertools.product(
        (False, True), (False, True), (1, 4), (False, True)
    )
]


def build_kwargs(geometry: dict, block: dict) -> dict:
    kwargs = dict(
        num_tokens=256,
        max_seq_len=64,
        dim=32,
        depth=2,
        heads=2,
        dim_head=16,
        local_attn_window_size=WINDOW,
        **geometry,
        qk_rmsnorm=block["qk_rmsnorm"],
        gate_values_per_head=block["gate_values_per_head"],
        num_residual_streams=block["num_residual_streams"],
    )
    if block["global_layers"]:
        kwargs["global_attn_layer"] = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32))
        kwargs["layers_insert_global_attn"] = (2,)
    return kwargs


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "-".join(f"{k}={v}" for k, v in b.items()))
@pytest.mark.parametrize("geometry", geometries(), ids=lambda g: "-".join(f"{k}={v}" for k, v in g.items()))
def test_logits_match_reference(geometry: dict, block: dict) -> None:
    reference, ours = reference_and_ours(seed=len(str(geometry)) + len(str(block)), **build_kwargs(geometry, block))
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 3 * WINDOW + 5), generator=generator)  # not a multiple of the window
    mask = torch.rand(tokens.shape, generator=generator) > 0.25
    with torch.no_grad():
        for length in (3 * WINDOW, tokens.shape[1]):
            x = tokens[:, :length]
            assert (reference(x) - ours(x)).abs().max() <= TOLERANCE
            m = mask[:, :length]
            assert (reference(x, mask=m) - ours(x, mask=m)).abs().max() <= TOLERANCE


def test_loss_matches_reference() -> None:
    reference, ours = reference_and_ours(num_tokens=256, max_seq_len=64, dim=32, depth=2, local_attn_window_size=8)
    tokens = torch.randint(0, 256, (3, 30))
    tokens[0, -1] = -1  # a label equal to ignore_index
    with torch.no_grad():
        assert torch.allclose(reference(tokens, return_loss=True), ours(tokens, return_loss=True), atol=TOLERANCE)


def test_without_token_embedding_maps_hidden_states() -> None:
    reference, ours = reference_and_ours(num_tokens=None, max_seq_len=64, dim=32, depth=2, local_attn_window_size=8)
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        assert (reference(x) - ours(x)).abs().max() <= TOLERANCE
    assert not hasattr(ours, "to_logits")


def test_constructor_defaults_match_reference() -> None:
    import inspect

    import local_attention

    for name in ("LocalTransformer", "LocalMHA", "LocalAttention"):
        theirs = inspect.signature(getattr(local_attention, name) if hasattr(local_attention, name) else None)
        mine = inspect.signature(getattr(model, name))
        for parameter in theirs.parameters.values():
            if parameter.kind is parameter.VAR_KEYWORD:
                continue
            assert parameter.name in mine.parameters, f"{name} lacks {parameter.name}"
            assert mine.parameters[parameter.name].default == parameter.default, f"{name}.{parameter.name}"


def test_without_absolute_positions_has_no_length_limit() -> None:
    ours = model.LocalTransformer(
        num_tokens=256, max_seq_len=16, dim=32, depth=1, local_attn_window_size=8, use_abs_pos_emb=False
    )
    assert "pos_emb.weight" not in ours.state_dict()
    with torch.no_grad():
        assert ours(torch.randint(0, 256, (1, 100))).shape == (1, 100, 256)


def test_absolute_positions_refuse_past_max_seq_len() -> None:
    ours = model.LocalTransformer(num_tokens=256, max_seq_len=16, dim=32, depth=1, local_attn_window_size=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        ours(torch.randint(0, 256, (1, 17)))


def test_strict_load_rejects_foreign_keys() -> None:
    reference, ours = reference_and_ours(num_tokens=256, max_seq_len=64, dim=32, depth=1, local_attn_window_size=8)
    state = reference.state_dict()
    state["unexpected.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected"):
        ours.load_state_dict(state, strict=True)
