"""KV cache: the keys and values of past positions, kept so generation does not recompute them.

Generating token t+1 needs attention of the new query over the keys and values
of ALL positions 0..t. Without a cache the model reruns every position at every
step (O(T²) work per token); with one, each step runs only the new position
and reads the rest from here.

The cache is PREALLOCATED to ``max_len`` positions, one (B, H, max_len, Dh)
array for the keys and one for the values per layer (H = the model's key/value
heads: fewer than its query heads under grouped-query attention), with a position counter
``pos`` (positions filled so far). A forward over T new positions writes each
layer's new keys/values into the slot [pos, pos + T) — an in-place copy, no
re-concatenation of the growing history — and attends over [0, pos + T); then
the model calls ``advance(T)``.

    cache = KVCache(n_layer, batch, n_head, max_len, head_dim)
    with mm.no_grad():
        logits = model(prompt, cache=cache)              # prefill: pos 0 -> len(prompt)
        logits = model(next_token, cache=cache)          # one step:  pos -> pos + 1

The arrays live outside the autograd graph, so a cache is for inference only.
"""

from __future__ import annotations


import numpy as np

from .. import backend
from ..checks import is_integer


class KVCache:
    """Preallocated per-layer key/value arrays (B, H, max_len, Dh) and a fill position ``pos``."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype=np.float32, device="cpu"):
        for name, value in (("n_layer", n_layer), ("batch", batch), ("n_head", n_head),
                            ("max_len", max_len), ("head_dim", head_dim)):
            if not is_integer(value) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive integer, got {value!r}")
        self.n_layer, self.batch, self.n_head = n_layer, batch, n_head
        self.max_len, self.head_dim = max_len, head_dim
        self.dtype = np.dtype(dtype)
        self.device = backend.parse_device(device)
        xp = backend.module_for(self.device)
        shape = (batch, n_head, max_len, head_dim)                    # (B, H, max_len, Dh)
        with backend.device_context(self.device):
            self.keys = [xp.zeros(shape, dtype=self.dtype) for _ in range(n_layer)]
            self.values = [xp.zeros(shape, dtype=self.dtype) for _ in range(n_layer)]
        self.pos = 0

    def update(self, layer_index: int, k, v):
        """Write ``k``, ``v`` (B, H, T, Dh arrays) at positions [pos, pos + T) of a layer.

        Returns views of that layer's keys and values for positions [0, pos + T),
        shape (B, H, pos + T, Dh). Does not move ``pos`` (``advance`` does, once
        every layer has written).
        """
        if not 0 <= layer_index < self.n_layer:
            raise IndexError(f"KVCache: layer_index {layer_index} out of range for {self.n_layer} layers")
        expected = (self.batch, self.n_head, k.shape[2] if k.ndim == 4 else -1, self.head_dim)
        if k.shape != expected or v.shape != expected:
            raise ValueError(
                f"KVCache: expected keys/values of shape (B={self.batch}, H={self.n_head}, T, "
                f"Dh={self.head_dim}), got {k.shape} and {v.shape}"
            )
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache: {k.shape[2]} new positions after {self.pos} cached exceed the cache's "
                f"max_len={self.max_len}; reset() it (or crop the context) first"
            )
        keys, values = self.keys[layer_index], self.values[layer_index]
        keys[:, :, self.pos:end] = k                                  # in place: no re-concatenation
        values[:, :, self.pos:end] = v
        return keys[:, :, :end], values[:, :, :end]                   # (B, H, pos + T, Dh) views

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value arrays (all layers, all ``max_len`` positions)."""
        return sum(a.nbytes for a in self.keys + self.values)

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (called by the model after its last layer)."""
        if self.pos + n > self.max_len:
            raise ValueError(f"KVCache: cannot advance {n} past max_len={self.max_len} (pos={self.pos})")
        self.pos += n

    def reset(self) -> None:
        """Forget every cached position (the arrays are reused, not freed)."""
        self.pos = 0

    def __len__(self) -> int:
        return self.pos

    def __repr__(self) -> str:
        return (f"KVCache(n_layer={self.n_layer}, batch={self.batch}, n_head={self.n_head}, "
                f"pos={self.pos}/{self.max_len}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device='{self.device}')")
