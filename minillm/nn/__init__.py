"""Neural-network building blocks: ``Module``, ``Parameter``, layers, and the KV cache.

    from minillm import nn
    block = nn.TransformerBlock(d_model=64, n_head=4)
    y = block(x)                      # x: Tensor (B, T, 64) -> (B, T, 64)

Layers compose ops from ``minillm.functional``; none of them writes a backward.
"""

from .kv_cache import KVCache
from .layers import (
    GELU, Dropout, Embedding, FeedForward, LayerNorm, Linear, ModuleList, MultiHeadAttention,
    Sequential, TransformerBlock,
)
from .module import LoadResult, Module
from .parameter import Parameter

__all__ = [
    "Module", "Parameter", "LoadResult", "Linear", "Embedding", "LayerNorm", "Dropout", "GELU",
    "Sequential", "ModuleList", "FeedForward", "MultiHeadAttention", "TransformerBlock", "KVCache",
]
