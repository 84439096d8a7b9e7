"""GPT: one configurable decoder — GPT-2's architecture by default, Llama's and Qwen3's by configuration.

    ids (B, T) ──wte──> token embeddings (B, T, C)
               + wpe[0:T]  position embeddings (T, C), broadcast over the batch
               ──drop──> x (B, T, C)
    x ──h[0]──> … ──h[n_layer-1]──> (B, T, C)     pre-norm TransformerBlocks
      ──ln_f──> (B, T, C) ──(· wte.weightᵀ)──> logits (B, T, V)

The output head is TIED to the token embedding: logits = F.linear(x, wte.weight),
so the same (V, C) matrix turns ids into vectors and vectors into scores over
the vocabulary (GPT-2 does this; it saves V·C = 38.6M parameters at 124M).

Parameter names, one-to-one with GPT-2's checkpoint: ``wte.weight``,
``wpe.weight``, ``h.{i}.ln_1.weight``/``bias``, ``h.{i}.attn.c_attn.weight``/
``bias`` (q, k, v packed along the output axis, in that order),
``h.{i}.attn.c_proj.*``, ``h.{i}.ln_2.*``, ``h.{i}.mlp.c_fc.*``,
``h.{i}.mlp.c_proj.*``, ``ln_f.*``. (GPT-2's Conv1D stores weights as (in, out);
ours are (out, in) like PyTorch's Linear, so importers transpose them.)

Parameter count, C = d_model, L = context_length, with biases:

    V·C + L·C  +  n_layer · (12·C² + 13·C)  +  2·C
    (tokens, positions; per block: c_attn 3C²+3C, attn.c_proj C²+C,
     c_fc 4C²+4C, mlp.c_proj 4C²+C, two LayerNorms 4C; ln_f 2C)

which is 124,439,808 for gpt2-124m. Without biases a block has 12·C² + 2·C
and ln_f C.

The same decoder, configured (``GPTConfig``'s second group of fields; presets
``llama-tiny``, ``llama-3.2-1b``, ``qwen3-0.6b``), is a Llama or a Qwen3:

    GPT-2                              Llama 3 / Qwen3
    learned positions wpe              rotary positions on q and k (positions="rope", rope_theta)
    LayerNorm (with bias)              RMSNorm (norm="rmsnorm"), no biases anywhere (bias=False)
    GELU MLP, c_fc (4C)                SwiGLU MLP (mlp="swiglu"): c_fc packs [gate | up]
    n_head k/v heads                   n_kv_head < n_head (grouped-query attention)
    head_dim = C / n_head              any head_dim (Qwen3-0.6B: 128)
    —                                  Qwen3: RMSNorm of q and k per head (qk_norm; attn.q_norm, attn.k_norm)
    tied head                          tied or a separate lm_head (tie_embeddings)

The names stay GPT-2's (``minillm.weights`` maps Hugging Face's Llama/Qwen3
names — q_proj/k_proj/v_proj packed into c_attn, gate_proj/up_proj into c_fc,
input_layernorm = ln_1, … — onto them). ``gpt_num_parameters`` counts any
configuration.

Initialisation (GPT-2 / nanoGPT): every Linear and Embedding weight ~ N(0, 0.02²),
biases 0, LayerNorm weight 1 and bias 0, and the two projections that write into
the residual stream (``attn.c_proj.weight``, ``mlp.c_proj.weight``) ~ N(0, (0.02 /
sqrt(2·n_layer))²): the stream is a sum of 2·n_layer such branches, so this keeps
its variance at init independent of depth.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import Dropout, Embedding, KVCache, Linear, Module, ModuleList, TransformerBlock
from ..nn.layers import MLP_ACTIVATIONS, NORMS, make_norm
from ..ops.rope import rope_frequencies
from ..tensor import Tensor
from ..checks import is_integer, is_real

INIT_STD = 0.02  # GPT-2's standard deviation for every weight matrix and embedding


@dataclass
class GPTConfig:
    """The shape of a GPT. Defaults are GPT-2 small (124M); ``from_preset`` has the others."""

    vocab_size: int = 50257        # token ids are in [0, vocab_size); GPT-2: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 1024     # the most positions the model can see at once (rows of wpe)
    n_layer: int = 12              # number of transformer blocks
    n_head: int = 12               # attention heads per block; each has d_model // n_head dimensions
    d_model: int = 768             # width C of the residual stream (embedding size)
    dropout: float = 0.0           # dropout on embeddings, attention weights and residual branches (0 = off)
    bias: bool = True              # biases in Linear and LayerNorm layers (GPT-2 has them)
    layer_norm_eps: float = 1e-5   # epsilon inside LayerNorm's square root (GPT-2: 1e-5)
    gelu_approximate: str = "tanh"  # GELU form in the MLP: "tanh" (GPT-2's) or "none" (exact, erf)
    # The modern decoder (Llama, Qwen3): the defaults below are GPT-2's choices.
    positions: str = "learned"     # "learned" (wpe, GPT-2) or "rope" (rotary, applied to q and k)
    norm: str = "layernorm"        # "layernorm" (GPT-2) or "rmsnorm"; layer_norm_eps is its epsilon
    mlp: str = "gelu"              # "gelu" (Linear-GELU-Linear) or "swiglu" (silu(x W_gate) ⊙ x W_up, then down)
    mlp_hidden: int | None = None  # the MLP's inner width; None = 4 * d_model (GELU), or for SwiGLU's three
                                   # matrices 8/3 * d_model rounded up to a multiple of 8 (the same count)
    n_kv_head: int | None = None   # key/value heads (grouped-query attention); None = n_head
    head_dim: int | None = None    # features per head; None = d_model // n_head (Qwen3-0.6B: 128 with d_model 1024)
    qk_norm: bool = False          # RMSNorm over head_dim on q and k before rope (Qwen3)
    tie_embeddings: bool = True    # output head = wte (GPT-2, small Llamas, Qwen3-0.6B); False: its own lm_head
    rope_theta: float = 10000.0    # base of the rotary frequencies (Llama 3: 500,000; Qwen3: 1,000,000)
    rope_scaling: dict | None = None  # Llama 3 frequency scaling: factor, low_freq_factor, high_freq_factor,
                                      # original_max_position_embeddings (None = off)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if not is_integer(value) or value <= 0:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig: d_model={self.d_model} must be divisible by n_head={self.n_head} "
                f"(each head gets d_model // n_head dimensions)"
            )
        if not is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be a probability in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.bias, (bool, np.bool_)):
            raise ValueError(f"GPTConfig: bias must be True or False, got {self.bias!r}")
        self.bias = bool(self.bias)
        if not _positive_finite(self.layer_norm_eps):
            raise ValueError(f"GPTConfig: layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        self.layer_norm_eps = float(self.layer_norm_eps)
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"GPTConfig: gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}")
        for name, choices in (("positions", ("learned", "rope")), ("norm", NORMS), ("mlp", MLP_ACTIVATIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig: {name} must be one of {', '.join(map(repr, choices))}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("mlp_hidden", "n_kv_head", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value <= 0):
                raise ValueError(f"GPTConfig: {name} must be a positive integer or None, got {value!r}")
        self.n_kv_head = self.n_head if self.n_kv_head is None else int(self.n_kv_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                             f"(each key/value head serves n_head // n_kv_head query heads)")
        self.head_dim = self.d_model // self.n_head if self.head_dim is None else int(self.head_dim)
        if self.mlp_hidden is not None:
            self.mlp_hidden = int(self.mlp_hidden)
        elif self.mlp == "swiglu":
            self.mlp_hidden = -(-8 * self.d_model // 24) * 8      # ⌈(8/3)·C / 8⌉ · 8: 3·C·h ≈ GELU's 8·C²
        for name in ("qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"GPTConfig: {name} must be True or False, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        if self.positions == "rope":
            if self.head_dim % 2:
                raise ValueError(f"GPTConfig: rotary positions need an even head_dim, got {self.head_dim}")
            if not _positive_finite(self.rope_theta):
                raise ValueError(f"GPTConfig: rope_theta must be a positive number, got {self.rope_theta!r}")
            self.rope_theta = float(self.rope_theta)
            if self.rope_scaling is not None:
                if not isinstance(self.rope_scaling, dict):
                    raise ValueError(f"GPTConfig: rope_scaling must be a dict (Llama 3's factor, low_freq_factor, "
                                     f"high_freq_factor, original_max_position_embeddings) or None, "
                                     f"got {self.rope_scaling!r}")
                try:
                    rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)   # raises, naming the problem
                except ValueError as error:
                    raise ValueError(f"GPTConfig: rope_scaling: {error}") from None
                self.rope_scaling = dict(self.rope_scaling)
        elif self.rope_scaling is not None:
            raise ValueError("GPTConfig: rope_scaling needs positions='rope'")

    def kv_cache_bytes(self, length: int, batch: int = 1, dtype=np.float32) -> int:
        """Bytes of a KV cache holding ``length`` positions of ``batch`` sequences.

        Keys and values, every layer: 2 · n_layer · batch · n_kv_head · length · head_dim
        numbers. Grouped-query attention divides it by n_head / n_kv_head.
        """
        return 2 * self.n_layer * batch * self.n_kv_head * length * self.head_dim * np.dtype(dtype).itemsize

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration, with any field overridden: ``from_preset("tiny", vocab_size=65)``."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            names = ", ".join(repr(n) for n in [*PRESETS, *PRESET_ALIASES])
            raise ValueError(f"GPTConfig: unknown preset {name!r}; choose one of {names}")
        return cls.from_dict({**PRESETS[key], **overrides})

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError (naming them)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        return cls(**values)


# The choices that make the decoder a Llama (Qwen3 adds qk_norm): no biases, rotary
# positions, RMSNorm, SwiGLU. ``LLAMA_STYLE`` turns any GPT-2 shape into its Llama twin.
LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)

# GPT-2's published sizes (Radford et al. 2019; the released checkpoints), a tiny
# one that runs in milliseconds for tests and examples, and the shapes of two
# current open models (random init; load the real weights with minillm.weights.load_hf).
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, context_length=64, n_layer=2, n_head=2, d_model=32),
    "gpt2-124m": dict(n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024),   # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, d_model=1280),    # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, d_model=1600),       # 1558M
    "llama-tiny": dict(vocab_size=256, context_length=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                       mlp_hidden=88, layer_norm_eps=1e-5, **LLAMA_STYLE),
    # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters
    "llama-3.2-1b": dict(vocab_size=128256, context_length=131072, n_layer=16, n_head=32, n_kv_head=8,
                         d_model=2048, mlp_hidden=8192, layer_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         **LLAMA_STYLE),
    # Qwen/Qwen3-0.6B: 596,049,920 parameters (head_dim 128 > d_model / n_head = 64)
    "qwen3-0.6b": dict(vocab_size=151936, context_length=40960, n_layer=28, n_head=16, n_kv_head=8,
                       d_model=1024, head_dim=128, mlp_hidden=3072, layer_norm_eps=1e-6, rope_theta=1000000.0,
                       qk_norm=True, **LLAMA_STYLE),
}
PRESET_ALIASES = {"gpt2": "gpt2-124m", "gpt2-small": "gpt2-124m"}


def _positive_finite(value) -> bool:
    """True for a real number in (0, inf) that is not a bool (True would pass as 1.0)."""
    return (not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
            and 0 < value < math.inf)


def embedding_modules(config: GPTConfig, *, device=None, dtype=None):
    """(wte, wpe or None, drop): the token and position embeddings and the dropout after them."""
    C = config.d_model
    wte = Embedding(config.vocab_size, C, init_std=INIT_STD, device=device, dtype=dtype)  # also the tied head
    # learned position embeddings; rotary (None): positions enter inside attention
    wpe = (Embedding(config.context_length, C, init_std=INIT_STD, device=device, dtype=dtype)
           if config.positions == "learned" else None)
    return wte, wpe, Dropout(config.dropout)


def transformer_block(config: GPTConfig, *, device=None, dtype=None) -> TransformerBlock:
    """One of ``config``'s n_layer blocks, freshly drawn: weights ~ N(0, INIT_STD²), the two projections
    into the residual stream (attn.c_proj, mlp.c_proj) ~ N(0, INIT_STD² / (2 n_layer))."""
    residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
    rope = config.positions == "rope"
    return TransformerBlock(config.d_model, config.n_head, config.dropout, config.bias, config.layer_norm_eps,
                            hidden=config.mlp_hidden, gelu_approximate=config.gelu_approximate,
                            norm=config.norm, activation=config.mlp, n_kv_head=config.n_kv_head,
                            head_dim=config.head_dim, qk_norm=config.qk_norm,
                            rope_theta=config.rope_theta if rope else None,
                            rope_scaling=config.rope_scaling if rope else None,
                            init_std=INIT_STD, proj_init_std=residual_std, device=device, dtype=dtype)


def head_modules(config: GPTConfig, *, device=None, dtype=None):
    """(ln_f, lm_head or None): the final norm and, untied, a separate (V, C) output matrix (HF's lm_head);
    tied (None): logits = x @ wteᵀ."""
    C = config.d_model
    ln_f = make_norm(config.norm, C, config.layer_norm_eps, config.bias, device=device, dtype=dtype)
    lm_head = None if config.tie_embeddings else Linear(C, config.vocab_size, bias=False, init_std=INIT_STD,
                                                        device=device, dtype=dtype)
    return ln_f, lm_head


class GPT(Module):
    """A GPT-2-style decoder-only transformer; ``model(ids)`` -> logits (B, T, vocab_size).

    Calling convention: ``model(ids)`` returns the logits Tensor;
    ``model(ids, targets)`` returns the pair ``(logits, loss)`` with ``loss`` the
    mean cross-entropy over all positions whose target is not -100.
    """

    def __init__(self, config: GPTConfig, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        init = dict(device=device, dtype=dtype)
        # the three parts, drawn in this order from the random stream (a pipeline stage builds only its own)
        self.wte, self.wpe, self.drop = embedding_modules(config, **init)
        self.h = ModuleList(transformer_block(config, **init) for _ in range(config.n_layer))
        self.ln_f, self.lm_head = head_modules(config, **init)

    # ------------------------------------------------------------ forward
    def forward(self, ids, targets=None, cache: KVCache | None = None):
        """ids (B, T) integers -> logits (B, T, V); with ``targets`` (B, T), ``(logits, loss)``.

        With a ``cache`` (inference under ``mm.no_grad()``), ``ids`` are the
        positions after the ``cache.pos`` already cached; the cache is advanced by T.
        """
        x = self.hidden_states(ids, cache)                           # (B, T, C)
        logits = F.linear(x, self.output_weight)                     # (B, T, V): x @ Wᵀ, W = wte when tied
        if cache is not None:
            cache.advance(x.shape[1])
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets)

    def hidden_states(self, ids, cache: KVCache | None = None):
        """ids (B, T) -> the final-norm hidden states (B, T, C) that the LM head reads.

        Other heads (a classifier's) read these too. With a ``cache``, the
        caller advances it afterwards (``forward`` does).
        """
        ids = self._check_ids(ids)
        B, T = ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context_length:
            where = f" after {start} cached positions" if start else ""
            raise ValueError(
                f"GPT: sequence length {start + T} ({T} new ids{where}) exceeds the model's "
                f"context_length={self.config.context_length}; crop the input to the last "
                f"{self.config.context_length} tokens"
            )
        x = self.wte(ids)                                            # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe.weight[start:start + T]                 # (T, C): rows start .. start+T-1 of wpe
        x = self.drop(x)                                             # (B, T, C)
        for index, block in enumerate(self.h):
            x = block(x, cache=cache, layer_index=index)             # (B, T, C)
        return self.ln_f(x)                                          # (B, T, C)

    @property
    def output_weight(self):
        """The (V, C) matrix of the output head: ``lm_head.weight``, or ``wte.weight`` when tied."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def _check_ids(self, ids):
        """``ids`` as a 2-D integer array on the model's device (range is checked by the embedding)."""
        if isinstance(ids, Tensor):
            ids = ids.data
        if not hasattr(ids, "dtype") or isinstance(ids, np.generic):
            ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"GPT: token ids must be integers, got dtype {ids.dtype}")
        if ids.ndim != 2:
            raise ValueError(
                f"GPT: token ids must have shape (batch, time), got {ids.ndim}-d shape {tuple(ids.shape)} "
                f"(use ids[None] for a single sequence)"
            )
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"GPT: token ids of shape {tuple(ids.shape)} are empty: a model needs at least one "
                             f"sequence of at least one token")
        return backend.to_device(ids, self.wte.weight.device)

    # ------------------------------------------------------------ inference helpers
    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model: ``batch`` sequences of up to ``max_len`` (default context_length)."""
        cfg = self.config
        max_len = cfg.context_length if max_len is None else max_len
        if max_len > cfg.context_length:
            raise ValueError(f"GPT: a cache of {max_len} positions exceeds context_length={cfg.context_length}")
        weight = self.wte.weight
        # one (B, n_kv_head, max_len, head_dim) array each for keys and values per layer: GQA's saving
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim, dtype=weight.dtype,
                       device=weight.device)

    def generate(self, ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 seed=None, use_cache=True):
        """Continue ``ids`` by ``max_new_tokens`` sampled tokens: see ``minillm.generate.generate``."""
        from ..generate import generate  # noqa: PLC0415 (generate imports models; import lazily)

        return generate(self, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_id=eos_id, seed=seed, use_cache=use_cache)

    def extra_repr(self) -> str:
        return f"{self.num_parameters():,} parameters"


def llama_style(config: GPTConfig, n_kv_head: int | None = None, qk_norm: bool = False) -> GPTConfig:
    """The Llama-style twin of ``config`` with (nearly) its parameter count, for side-by-side comparisons.

    Rotary positions, RMSNorm, SwiGLU, no biases (``LLAMA_STYLE``), ``n_kv_head``
    key/value heads (default: n_head) and q/k norm if asked; the SwiGLU width h
    is solved for: the count is linear in h (3·d_model·h per block), so
    h = 1 + (target − count at h = 1) / (3·d_model·n_layer), rounded. What the
    twin saves (wpe, biases, fewer k/v heads) goes into a wider MLP.
    """
    twin = dataclasses.replace(config, **LLAMA_STYLE, n_kv_head=n_kv_head or config.n_head, qk_norm=qk_norm,
                               mlp_hidden=1)
    per_unit = 3 * config.d_model * config.n_layer
    hidden = 1 + round((gpt_num_parameters(config) - gpt_num_parameters(twin)) / per_unit)
    return dataclasses.replace(twin, mlp_hidden=max(1, hidden))


def gpt_num_parameters(config: GPTConfig) -> int:
    """The parameter count from the configuration (no model built); the module docstring has GPT-2's case."""
    C, V, L, bias = config.d_model, config.vocab_size, config.context_length, config.bias
    q_width, kv_width = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    hidden = 4 * C if config.mlp_hidden is None else config.mlp_hidden
    norm = 2 * C if config.norm == "layernorm" and bias else C                # weight (+ bias)
    attention = C * (q_width + 2 * kv_width) + q_width * C + (q_width + 2 * kv_width + C if bias else 0)
    attention += 2 * config.head_dim if config.qk_norm else 0
    up_width = 2 * hidden if config.mlp == "swiglu" else hidden               # [gate | up] or c_fc
    mlp = C * up_width + hidden * C + (up_width + C if bias else 0)
    embeddings = V * C * (1 if config.tie_embeddings else 2) + (L * C if config.positions == "learned" else 0)
    return embeddings + config.n_layer * (attention + mlp + 2 * norm) + norm
