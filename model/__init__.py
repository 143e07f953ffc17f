"""The network: local attention, LocalMHA and LocalTransformer (local-attention 1.11.2 compatible)."""

from model.attention import LocalAttention
from model.transformer import LocalMHA, LocalTransformer

__all__ = ["LocalAttention", "LocalMHA", "LocalTransformer"]
