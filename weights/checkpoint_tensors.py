"""The tensors of a checkpoint: what is saved from a model, and what keeps a set of tensors from loading into one.

A checkpoint must load strictly: every tensor named, shaped and typed as the model expects, nothing missing or
extra. tensor_problems lists every way a set of tensors falls short, so saving, loading and converting can
refuse it with one message before a single tensor reaches a model.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # stored floats we accept, and load into


def tensors_to_save(model: torch.nn.Module) -> dict[str, Tensor]:
    """The state dict on the CPU, contiguous, with tensors that share storage cloned (safetensors refuses)."""
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors


def tensor_problems(expected: dict[str, Tensor], found: dict[str, Tensor]) -> list[str]:
    """What keeps `found` from loading strictly into a model whose state dict is `expected`."""
    problems = []
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if missing:
        problems.append(f"missing tensors {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {listed(unexpected)}")
    for name in sorted(expected.keys() & found.keys()):
        want, have = expected[name], found[name]
        if have.shape != want.shape:
            problems.append(f"tensor {name} has shape {tuple(have.shape)}, expected {tuple(want.shape)}")
        if want.is_floating_point() and have.dtype not in FLOAT_DTYPES:
            accepted = ", ".join(str(dtype) for dtype in FLOAT_DTYPES)
            problems.append(f"tensor {name} has dtype {have.dtype}, expected one of {accepted}")
        elif not want.is_floating_point() and have.dtype != want.dtype:
            problems.append(f"tensor {name} has dtype {have.dtype}, expected {want.dtype}")
    return problems


def listed(names: list[str], limit: int = 5) -> str:
    """The first `limit` names, and how many more: a message stays readable however many tensors are wrong."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
