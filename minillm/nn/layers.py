"""Layers: Modules that hold parameters and compose ops (none writes a backward).

The basic layers wrap one op each (Linear -> F.linear, LayerNorm ->
F.layer_norm, ...); the transformer layers (FeedForward, MultiHeadAttention,
TransformerBlock) compose them. Submodule names follow GPT-2's checkpoint
(``c_fc``, ``c_proj``, ``c_attn``, ``ln_1``, ``attn``, ``ln_2``, ``mlp``), so a
model's ``state_dict`` keys map one-to-one onto GPT-2's.

Initialisation: every random weight is drawn from the CPU random stream
(``backend.random_normal``) and then copied to ``device``, so one
``mm.manual_seed`` gives the same model on the CPU and on any GPU. Inside
``init_on_device()`` they are drawn by the device's own random stream instead
(no host work, no copy): for a model too big to draw on the host quickly (a
pipeline stage of a 10B model, ``distributed.pipeline.build_stage(...,
own_stream=True)``), at the price of weights that depend on the device.
Inside ``draws_discarded()`` the layers built hold nothing: their random
weights are drawn (so the CPU stream moves on exactly as far) and thrown away,
which lets a pipeline stage draw only its own parts and still get, sample for
sample, the weights one process gives them (``build_stage``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor, is_grad_enabled
from .module import Module
from .parameter import Parameter
from ..checks import is_real


# ------------------------------------------------------------------ initialisation helpers


def _dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype) if dtype is not None else backend.get_default_dtype()
    if dtype.kind != "f":
        raise TypeError(f"parameters must be floating point, got dtype {dtype}")
    return dtype


_draw_on_device = [False]   # set inside init_on_device()


@contextmanager
def init_on_device():
    """Draw the random weights of the layers built inside on their own device's stream (see the module doc)."""
    previous, _draw_on_device[0] = _draw_on_device[0], True
    try:
        yield
    finally:
        _draw_on_device[0] = previous


DISCARD_CHUNK = 1 << 20     # samples drawn at once while discarding (4 MiB of float32)
_discarding = [False]       # set inside draws_discarded()


@contextmanager
def draws_discarded():
    """Build layers that hold nothing but advance the CPU random stream as if they were drawn.

    Inside, ``normal_parameter`` draws its samples from the CPU stream in chunks
    of ``DISCARD_CHUNK`` and throws them away, and ``constant_parameter`` fills
    nothing; both return a read-only placeholder Parameter without storage (a
    zero-stride view of one number, on the CPU). The stream ends exactly where
    building the layers for real leaves it: the bit generator is sequential and
    a float32 normal's ziggurat draw depends only on the generator's state
    (including PCG64's buffered 32-bit half), so n float32 samples drawn in
    chunks consume the same raw draws as one call for n (a float64 draw would
    not: it consumes 64 bits per sample). ``distributed.pipeline.build_stage``
    builds the other stages' parts this way.
    """
    previous, _discarding[0] = _discarding[0], True
    try:
        yield
    finally:
        _discarding[0] = previous


def discard_normal_draws(count: int, chunk: int | None = None) -> None:
    """Advance the CPU stream past ``count`` float32 normal samples, drawn ``chunk`` at a time and dropped
    (one reused buffer of at most ``chunk`` numbers: the memory of a chunk, whatever ``count``)."""
    chunk = DISCARD_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"discard_normal_draws: chunk must be at least 1, got {chunk}")
    rng = backend.cpu_generator()
    buffer = np.empty(min(count, chunk), dtype=np.float32)
    while count > 0:
        n = min(count, chunk)
        rng.standard_normal(dtype=np.float32, out=buffer[:n])     # the same raw draws as normal_parameter's
        count -= n


def _placeholder(shape, value: float, dtype) -> Parameter:
    """A read-only Parameter of ``shape`` reading ``value`` everywhere, holding one number (stride 0)."""
    return Parameter(np.broadcast_to(np.full((), value, dtype=dtype), shape))


def normal_parameter(shape, std: float, device=None, dtype=None) -> Parameter:
    """A Parameter ~ Normal(0, std²), drawn on the CPU stream, then moved to ``device``
    (inside ``init_on_device()``: drawn on ``device`` by its stream; inside
    ``draws_discarded()``: drawn on the CPU stream and dropped, a placeholder returned).

    Always drawn in float32 and then cast, so a seed gives the same weights
    (up to rounding) whatever the dtype and device.
    """
    if _discarding[0]:
        discard_normal_draws(math.prod(shape))
        return _placeholder(shape, 0.0, _dtype(dtype))
    where = backend.parse_device(device) if _draw_on_device[0] and device is not None else "cpu"
    data = backend.random_normal(shape, device=where, dtype=np.float32, std=std)
    dtype = _dtype(dtype)
    return Parameter(data if dtype == data.dtype else data.astype(dtype), device=device)


def constant_parameter(shape, value: float, device=None, dtype=None) -> Parameter:
    """A Parameter filled with ``value`` (LayerNorm's ones, biases' zeros); a placeholder inside ``draws_discarded()``."""
    if _discarding[0]:
        return _placeholder(shape, value, _dtype(dtype))
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


class RMSNorm(Module):
    """Divide the last axis by its root mean square, then scale by ``weight`` (Llama, Qwen): no centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = constant_parameter((dim,), 1.0, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"({self.dim},), eps={self.eps}"


NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, eps: float, bias: bool = True, *, device=None, dtype=None) -> Module:
    """``LayerNorm`` (GPT-2) or ``RMSNorm`` (Llama, Qwen; it has no bias) by name."""
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias, device=device, dtype=dtype)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, device=device, dtype=dtype)
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


class Dropout(Module):
    """Zero each element with probability ``p`` while training (scaling the rest by 1/(1-p)); identity in eval."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not is_real(p) or not 0.0 <= p < 1.0:
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


MLP_ACTIVATIONS = ("gelu", "swiglu")


class FeedForward(Module):
    """The position-wise MLP of a transformer block: Linear -> GELU (or SwiGLU) -> Linear -> Dropout.

        gelu:   (B, T, C) --c_fc--> (B, T, hidden) --gelu--> --c_proj--> (B, T, C) --dropout-->
        swiglu: (B, T, C) --c_fc--> (B, T, 2·hidden) = [gate | up] --silu(gate) ⊙ up--> (B, T, hidden)
                          --c_proj--> (B, T, C) --dropout-->

    SwiGLU (Llama, Qwen) keeps the gate and up projections packed in one ``c_fc``
    (rows [W_gate; W_up]: one GEMM) and applies the fused ``F.swiglu``.
    ``hidden`` defaults to 4 * d_model (GPT-2). ``c_fc`` is drawn with ``init_std``,
    ``c_proj`` with ``proj_init_std`` (GPT scales it down: it feeds the residual stream).
    """

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0, bias: bool = True, *,
                 approximate: str = "tanh", activation: str = "gelu", init_std: float = 0.02,
                 proj_init_std: float | None = None, device=None, dtype=None):
        super().__init__()
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"FeedForward: activation must be one of {', '.join(MLP_ACTIVATIONS)}, "
                             f"got {activation!r}")
        hidden = 4 * d_model if hidden is None else hidden
        proj_init_std = init_std if proj_init_std is None else proj_init_std
        self.activation, self.hidden = activation, hidden
        width = 2 * hidden if activation == "swiglu" else hidden
        self.c_fc = Linear(d_model, width, bias, init_std=init_std, device=device, dtype=dtype)
        if activation == "gelu":
            self.gelu = GELU(approximate)
        self.c_proj = Linear(hidden, d_model, bias, init_std=proj_init_std, device=device, dtype=dtype)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)                                            # (B, T, hidden) or (B, T, 2·hidden)
        h = F.swiglu(h) if self.activation == "swiglu" else self.gelu(h)   # (B, T, hidden)
        return self.dropout(self.c_proj(h))                         # (B, T, C)


class MultiHeadAttention(Module):
    """Causal multi-head self-attention with one fused q, k, v projection (GPT-2's ``c_attn``).

        x (B, T, C) --c_attn--> (B, T, 3C) = [q | k | v], each C = n_head * head_dim wide
        split into heads                         q, k, v  (B, H, T, Dh)
        y = softmax(q kᵀ / sqrt(Dh) + causal mask) v      (B, H, T, Dh)   (F.scaled_dot_product_attention)
        heads side by side again                 (B, T, C) --c_proj--> --resid_dropout--> (B, T, C)

    The modern options (Llama, Qwen3): ``n_kv_head`` < ``n_head`` key/value heads
    (grouped-query attention: c_attn then packs [q | k | v] as n_head·Dh,
    n_kv_head·Dh, n_kv_head·Dh columns, and each key/value head serves
    n_head / n_kv_head query heads); ``head_dim`` other than d_model / n_head;
    ``qk_norm`` (Qwen3: RMSNorm over each head's Dh features of q and k, weights
    ``q_norm``, ``k_norm``); and ``rope_theta`` (rotary positions applied to q and
    k after the norm, at positions cache.pos … cache.pos + T − 1, so the cache
    holds keys already rotated; ``rope_scaling``: Llama 3's).

    Attention-probability dropout (``dropout``) is applied inside the attention
    op while training. With a ``KVCache`` (inference, under ``mm.no_grad()``),
    the new keys and values are written into the cache's preallocated slot for
    positions [cache.pos, cache.pos + T) of layer ``layer_index``, and the T new
    queries attend over all cache.pos + T keys; the caller (GPT.forward)
    advances ``cache.pos`` after the last layer.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True, *,
                 n_kv_head: int | None = None, head_dim: int | None = None, qk_norm: bool = False,
                 norm_eps: float = 1e-6, rope_theta: float | None = None, rope_scaling: dict | None = None,
                 init_std: float = 0.02, proj_init_std: float | None = None, device=None, dtype=None):
        super().__init__()
        if head_dim is None and d_model % n_head:
            raise ValueError(f"MultiHeadAttention: d_model={d_model} is not divisible by n_head={n_head}")
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_kv_head <= 0 or n_head % n_kv_head:
            raise ValueError(f"MultiHeadAttention: n_kv_head={n_kv_head} must divide n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: dropout must be in [0, 1), got {dropout!r}")
        self.d_model, self.n_head, self.n_kv_head = d_model, n_head, n_kv_head
        self.head_dim = d_model // n_head if head_dim is None else head_dim
        if rope_theta is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ValueError(f"MultiHeadAttention: rope rotates pairs of features, so the head size must be "
                             f"even and positive, got {self.head_dim}")
        self.dropout = float(dropout)
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        proj_init_std = init_std if proj_init_std is None else proj_init_std
        q_width, kv_width = n_head * self.head_dim, n_kv_head * self.head_dim
        self.c_attn = Linear(d_model, q_width + 2 * kv_width, bias, init_std=init_std, device=device, dtype=dtype)
        self.c_proj = Linear(q_width, d_model, bias, init_std=proj_init_std, device=device, dtype=dtype)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, norm_eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, norm_eps, device=device, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: Tensor, cache=None, layer_index: int = 0) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"MultiHeadAttention: expected input (B, T, {self.d_model}), got shape {x.shape}")
        B, T, C = x.shape
        H, Hkv, Dh = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)                                         # (B, T, (H + 2·Hkv)·Dh)
        if Hkv == H:
            # one reshape (a view) and one transpose (a view) put the three projections
            # and the heads on leading axes; indexing the first axis then picks q, k, v
            # without copying: (B, T, 3, H, Dh) -> (3, B, H, T, Dh)
            qkv = qkv.reshape(B, T, 3, H, Dh).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]                         # each (B, H, T, Dh)
        else:                                                        # GQA: [q | k | v] of unequal widths
            parts = F.split(qkv, [H * Dh, (H + Hkv) * Dh], axis=-1)
            q, k, v = (part.reshape(B, T, heads, Dh).transpose(0, 2, 1, 3)
                       for part, heads in zip(parts, (H, Hkv, Hkv)))  # q (B, H, T, Dh); k, v (B, Hkv, T, Dh)
        if self.q_norm is not None:                                  # Qwen3: RMSNorm per head, before rope
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:                              # rotate q, k by their absolute positions
            start = cache.pos if cache is not None else 0
            positions = range(start, start + T)
            q = F.rope(q, positions, self.rope_theta, self.rope_scaling)
            k = F.rope(k, positions, self.rope_theta, self.rope_scaling)
        if cache is not None:
            if is_grad_enabled():
                raise RuntimeError(
                    "the KV cache is for inference only: run the model under `with mm.no_grad():` "
                    "(cached keys/values are plain arrays, outside the autograd graph)"
                )
            keys, values = cache.update(layer_index, k.data, v.data)  # (B, Hkv, pos + T, Dh)
            k, v = Tensor(keys), Tensor(values)                       # constants: no graph under no_grad
        dropout_p = self.dropout if self.training else 0.0
        # causal with Tq = T <= Tk keys: the queries are the LAST T positions of the key sequence
        # k, v may have Hkv < H heads: the op shares each among H / Hkv query heads
        y = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=dropout_p)  # (B, H, T, Dh)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)             # heads side by side: (B, T, C)
                                                                     # (H * Dh = C/tp under tensor parallelism)
        return self.resid_dropout(self.c_proj(y))                    # (B, T, C)

    def extra_repr(self) -> str:
        extra = f", n_kv_head={self.n_kv_head}" if self.n_kv_head != self.n_head else ""
        if self.rope_theta is not None:
            extra += f", rope_theta={self.rope_theta}"
        return f"d_model={self.d_model}, n_head={self.n_head}{extra}, dropout={self.dropout}"


class TransformerBlock(Module):
    """A pre-norm block: two residual branches, each reading a normalised copy of the stream.

        x = x + attn(ln_1(x))        # tokens exchange information
        x = x + mlp(ln_2(x))         # each token is processed on its own

    GPT-2's block by default (LayerNorm, GELU MLP); ``norm="rmsnorm"``,
    ``activation="swiglu"`` and the attention options (``n_kv_head``,
    ``head_dim``, ``qk_norm``, ``rope_theta``, ``rope_scaling``) make it a Llama or
    Qwen3 block (there ln_1 / ln_2 are ``input_layernorm`` /
    ``post_attention_layernorm``).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 layer_norm_eps: float = 1e-5, *, hidden: int | None = None, gelu_approximate: str = "tanh",
                 norm: str = "layernorm", activation: str = "gelu", n_kv_head: int | None = None,
                 head_dim: int | None = None, qk_norm: bool = False, rope_theta: float | None = None,
                 rope_scaling: dict | None = None, init_std: float = 0.02, proj_init_std: float | None = None,
                 device=None, dtype=None):
        super().__init__()
        init = dict(init_std=init_std, proj_init_std=proj_init_std, device=device, dtype=dtype)
        self.ln_1 = make_norm(norm, d_model, layer_norm_eps, bias, device=device, dtype=dtype)
        self.attn = MultiHeadAttention(d_model, n_head, dropout, bias, n_kv_head=n_kv_head, head_dim=head_dim,
                                       qk_norm=qk_norm, norm_eps=layer_norm_eps, rope_theta=rope_theta,
                                       rope_scaling=rope_scaling, **init)
        self.ln_2 = make_norm(norm, d_model, layer_norm_eps, bias, device=device, dtype=dtype)
        self.mlp = FeedForward(d_model, hidden, dropout, bias, approximate=gelu_approximate,
                               activation=activation, **init)

    def forward(self, x: Tensor, cache=None, layer_index: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache, layer_index=layer_index)   # (B, T, C)
        x = x + self.mlp(self.ln_2(x))                                           # (B, T, C)
        return x
