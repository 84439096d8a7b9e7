"""Neural-network building blocks: ``Module``, ``Parameter``, layers, and the KV cache.

    from minillm import nn
    block = nn.TransformerBlock(d_model=64, n_head=4)
    y = block(x)                      # x: Tensor (B, T, 64) -> (B, T, 64)

Layers compose ops from ``minillm.functional``; none of them writes a backward.
"""

from .kv_cache import KVCache
from .layers import (
    GELU, Dropout, Embedding, FeedForward, LayerNorm, Linear, ModuleList, MultiHeadAttention,
    RMSNorm, Sequential, TransformerBlock,
)
from .lora import LoRALinear, apply_lora, load_adapters, merge_lora, save_adapters, unmerge_lora
from .module import LoadResult, Module
from .parameter import Parameter

__all__ = [
    "Module", "Parameter", "LoadResult", "Linear", "Embedding", "LayerNorm", "RMSNorm", "Dropout", "GELU",
    "Sequential", "ModuleList", "FeedForward", "MultiHeadAttention", "TransformerBlock", "KVCache",
    "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "save_adapters", "load_adapters",
]
