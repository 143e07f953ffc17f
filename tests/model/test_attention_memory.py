"""Attention memory grows as n * window: 32k positions fit where an n x n score matrix would not."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource, torch
import model
torch.set_num_threads(1)
attention = model.LocalAttention(window_size=128, causal=True, dim=64)
q, k, v = torch.randn(3, 1, 32768, 64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    out = attention(q, k, v)
assert out.shape == (1, 32768, 64) and torch.isfinite(out).all()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_forward_over_32k_positions_stays_far_below_dense_attention() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    growth = int(result.stdout.split()[-1])
    dense_scores = 32768 * 32768 * 4  # one float32 n x n score matrix: 4 GiB
    assert growth < 512 * 2**20, f"attention over 32k positions grew the process by {growth / 2**20:.0f} MiB"
    assert growth < dense_scores / 8
