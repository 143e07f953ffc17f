"""What training and evaluation both hand the byte-level model: text as a token tensor, and the precision it runs at.

Both live here, not in either user, so that training and evaluation feed the model the same way.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def bytes_tensor(data: bytes) -> Tensor:
    """bytes -> a uint8 tensor (n,) that owns a copy of them."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    """CPU bfloat16 autocast when `bf16`, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
