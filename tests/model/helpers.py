"""Shared builders for model tests: reference models with random weights and our copies of them."""

from __future__ import annotations

import local_attention
import torch

import model


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter so that zero-initialised parts (hyper-connection functions) matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return module


def reference_and_ours(seed: int = 0, **kwargs) -> tuple[torch.nn.Module, model.LocalTransformer]:
    """A local-attention LocalTransformer with random weights and ours loaded strictly from its state dict."""
    torch.manual_seed(seed)
    reference = randomize_(local_attention.LocalTransformer(**kwargs), seed).eval()
    ours = model.LocalTransformer(**kwargs).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours
