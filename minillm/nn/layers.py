"""Layers: Modules that hold parameters and compose ops (none writes a backward).

The basic layers wrap one op each (Linear -> F.linear, LayerNorm ->
F.layer_norm, ...); the transformer layers (FeedForward, MultiHeadAttention,
TransformerBlock) compose them. Submodule names follow GPT-2's checkpoint
(``c_fc``, ``c_proj``, ``c_attn``, ``ln_1``, ``attn``, ``ln_2``, ``mlp``), so a
model's ``state_dict`` keys map one-to-one onto GPT-2's.

Initialisation: every random weight is drawn from the CPU random stream
(``backend.random_normal``) and then copied to ``device``, so one
``mm.manual_seed`` gives the same model on the CPU and on any GPU.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor, is_grad_enabled
from .module import Module
from .parameter import Parameter


# ------------------------------------------------------------------ initialisation helpers


def _dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype) if dtype is not None else backend.get_default_dtype()
    if dtype.kind != "f":
        raise TypeError(f"parameters must be floating point, got dtype {dtype}")
    return dtype


def normal_parameter(shape, std: float, device=None, dtype=None) -> Parameter:
    """A Parameter ~ Normal(0, std²), drawn on the CPU stream, then moved to ``device``.

    Always drawn in float32 and then cast, so a seed gives the same weights
    (up to rounding) whatever the dtype and device.
    """
    data = backend.random_normal(shape, device="cpu", dtype=np.float32, std=std)
    dtype = _dtype(dtype)
    return Parameter(data if dtype == data.dtype else data.astype(dtype), device=device)


def constant_parameter(shape, value: float, device=None, dtype=None) -> Parameter:
    """A Parameter filled with ``value`` (LayerNorm's ones, biases' zeros)."""
    return Parameter(np.full(shape, value, dtype=_dtype(dtype)), device=device)


# ------------------------------------------------------------------ basic layers


class Linear(Module):
    """y = x @ weightᵀ + bias, weight (out_features, in_features) as in PyTorch and GPT-2's Conv1D transposed.

    Weights ~ Normal(0, init_std²), with ``init_std`` defaulting to 1/sqrt(in_features)
    (keeps the output's scale that of the input); biases start at zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 init_std: float | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        std = 1.0 / math.sqrt(in_features) if init_std is None else init_std
        self.weight = normal_parameter((out_features, in_features), std, device, dtype)
        self.bias = constant_parameter((out_features,), 0.0, device, dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)          # (…, in) -> (…, out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table: integer ids of shape S -> rows of ``weight`` (num_embeddings, dim), shape (*S, dim)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 init_std: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = normal_parameter((num_embeddings, embedding_dim), init_std, device, dtype)

    def forward(self, ids) -> Tensor:
        return F.embedding(ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise the last axis to mean 0, variance 1, then scale by ``weight`` and shift by ``bias``."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = constant_parameter((dim,), 1.0, device, dtype)
        self.bias = constant_parameter((dim,), 0.0, device, dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"({self.dim},), eps={self.eps}, bias={self.bias is not None}"


class Dropout(Module):
    """Zero each element with probability ``p`` while training (scaling the rest by 1/(1-p)); identity in eval."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GELU(Module):
    """GELU(x) = x Φ(x); ``approximate="tanh"`` (GPT-2's) or ``"none"`` (exact, with erf)."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"GELU: approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


# ------------------------------------------------------------------ containers


class Sequential(Module):
    """Modules applied one after another: ``Sequential(a, b, c)(x) == c(b(a(x)))``; children named "0", "1", …"""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, module in enumerate(modules):
            self.add_module(str(i), module)

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ModuleList(Module):
    """A list of modules whose parameters are registered (children named "0", "1", …). Has no forward."""

    def __init__(self, modules=()):
        super().__init__()
        self.extend(modules)

    def append(self, module: Module) -> "ModuleList":
        self.add_module(str(len(self._modules)), module)
        return self

    def extend(self, modules) -> "ModuleList":
        for module in modules:
            self.append(module)
        return self

    def __getitem__(self, index):
        modules = list(self._modules.values())
        if isinstance(index, slice):
            return ModuleList(modules[index])
        return modules[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


# ------------------------------------------------------------------ transformer layers


class FeedForward(Module):
    """The position-wise MLP of a transformer block: Linear -> GELU -> Linear -> Dropout.

        (B, T, C) --c_fc--> (B, T, hidden) --gelu--> --c_proj--> (B, T, C) --dropout-->

    ``hidden`` defaults to 4 * d_model (GPT-2). ``c_fc`` is drawn with ``init_std``,
    ``c_proj`` with ``proj_init_std`` (GPT scales it down: it feeds the residual stream).
    """

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0, bias: bool = True, *,
                 approximate: str = "tanh", init_std: float = 0.02, proj_init_std: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        hidden = 4 * d_model if hidden is None else hidden
        proj_init_std = init_std if proj_init_std is None else proj_init_std
        self.c_fc = Linear(d_model, hidden, bias, init_std=init_std, device=device, dtype=dtype)
        self.gelu = GELU(approximate)
        self.c_proj = Linear(hidden, d_model, bias, init_std=proj_init_std, device=device, dtype=dtype)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))   # (B, T, C)


class MultiHeadAttention(Module):
    """Causal multi-head self-attention with one fused q, k, v projection (GPT-2's ``c_attn``).

        x (B, T, C) --c_attn--> (B, T, 3C) = [q | k | v], each C = n_head * head_dim wide
        split into heads                         q, k, v  (B, H, T, Dh)
        y = softmax(q kᵀ / sqrt(Dh) + causal mask) v      (B, H, T, Dh)   (F.scaled_dot_product_attention)
        heads side by side again                 (B, T, C) --c_proj--> --resid_dropout--> (B, T, C)

    Attention-probability dropout (``dropout``) is applied inside the attention
    op while training. With a ``KVCache`` (inference, under ``mm.no_grad()``),
    the new keys and values are written into the cache's preallocated slot for
    positions [cache.pos, cache.pos + T) of layer ``layer_index``, and the T new
    queries attend over all cache.pos + T keys; the caller (GPT.forward)
    advances ``cache.pos`` after the last layer.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True, *,
                 init_std: float = 0.02, proj_init_std: float | None = None, device=None, dtype=None):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"MultiHeadAttention: d_model={d_model} is not divisible by n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.n_head, self.head_dim = d_model, n_head, d_model // n_head
        self.dropout = float(dropout)
        proj_init_std = init_std if proj_init_std is None else proj_init_std
        self.c_attn = Linear(d_model, 3 * d_model, bias, init_std=init_std, device=device, dtype=dtype)
        self.c_proj = Linear(d_model, d_model, bias, init_std=proj_init_std, device=device, dtype=dtype)
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: Tensor, cache=None, layer_index: int = 0) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: expected input (B, T, {self.d_model}), got shape {x.shape}")
        B, T, C = x.shape
        H, Dh = self.n_head, self.head_dim
        qkv = self.c_attn(x)                                         # (B, T, 3C)
        # one reshape (a view) and one transpose (a view) put the three projections
        # and the heads on leading axes; indexing the first axis then picks q, k, v
        # without copying: (B, T, 3, H, Dh) -> (3, B, H, T, Dh)
        qkv = qkv.reshape(B, T, 3, H, Dh).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                             # each (B, H, T, Dh)
        if cache is not None:
            if is_grad_enabled():
                raise RuntimeError(
                    "the KV cache is for inference only: run the model under `with mm.no_grad():` "
                    "(cached keys/values are plain arrays, outside the autograd graph)"
                )
            keys, values = cache.update(layer_index, k.data, v.data)  # (B, H, pos + T, Dh)
            k, v = Tensor(keys), Tensor(values)                       # constants: no graph under no_grad
        dropout_p = self.dropout if self.training else 0.0
        # causal with Tq = T <= Tk keys: the queries are the LAST T positions of the key sequence
        y = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=dropout_p)  # (B, H, T, Dh)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)             # heads side by side: (B, T, C)
                                                                     # (H * Dh = C/tp under tensor parallelism)
        return self.resid_dropout(self.c_proj(y))                    # (B, T, C)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_head={self.n_head}, dropout={self.dropout}"


class TransformerBlock(Module):
    """A pre-norm GPT-2 block: two residual branches, each reading a layer-normed copy of the stream.

        x = x + attn(ln_1(x))        # tokens exchange information
        x = x + mlp(ln_2(x))         # each token is processed on its own
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 layer_norm_eps: float = 1e-5, *, hidden: int | None = None, gelu_approximate: str = "tanh",
                 init_std: float = 0.02, proj_init_std: float | None = None, device=None, dtype=None):
        super().__init__()
        init = dict(init_std=init_std, proj_init_std=proj_init_std, device=device, dtype=dtype)
        self.ln_1 = LayerNorm(d_model, layer_norm_eps, bias, device=device, dtype=dtype)
        self.attn = MultiHeadAttention(d_model, n_head, dropout, bias, **init)
        self.ln_2 = LayerNorm(d_model, layer_norm_eps, bias, device=device, dtype=dtype)
        self.mlp = FeedForward(d_model, hidden, dropout, bias, approximate=gelu_approximate, **init)

    def forward(self, x: Tensor, cache=None, layer_index: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache, layer_index=layer_index)   # (B, T, C)
        x = x + self.mlp(self.ln_2(x))                                           # (B, T, C)
        return x
