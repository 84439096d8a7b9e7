"""Rotary position embedding (RoPE): rotate pairs of features by an angle that grows with position.

For a query or key row x (D features, D even) at position m, split x into halves
x = [x₁, x₂] (each D/2; Hugging Face's "rotate_half" layout: feature i pairs with
feature i + D/2) and rotate each pair (x₁ᵢ, x₂ᵢ) by the angle m·ωᵢ:

    ωᵢ = θ^(−2i/D)                    i = 0 … D/2 − 1   (θ = ``theta``, 10,000 by default)
    y₁ = x₁ ⊙ cos(mω) − x₂ ⊙ sin(mω)
    y₂ = x₂ ⊙ cos(mω) + x₁ ⊙ sin(mω)

Why it encodes *relative* position: with q at position m and k at position n,
each pair contributes  ⟨R(mω) q, R(nω) k⟩ = ⟨q, R(mω)ᵀ R(nω) k⟩ = ⟨q, R((n − m)ω) k⟩
(rotations compose, R(a)ᵀ = R(−a)), so the attention score depends on the
positions only through the offset n − m. docs/model.md works this out.

Backward: y = R x with R a rotation (per pair), so dL/dx = Rᵀ dL/dy: the same
rotation by the NEGATIVE angle,

    dx₁ = g₁ ⊙ cos(mω) + g₂ ⊙ sin(mω)
    dx₂ = g₂ ⊙ cos(mω) − g₁ ⊙ sin(mω)

and nothing needs saving beyond the cos/sin tables (no input, no output).

``positions`` are the absolute positions of the T rows, so decoding with a KV
cache passes ``arange(start, start + T)``: the new keys are rotated for where
they sit, and the cached ones were rotated when they were computed.

Llama 3's frequency scaling (``scaling``): for a model trained on contexts of
``original_max_position_embeddings`` tokens L, frequencies whose wavelength
2π/ωᵢ is longer than L / ``low_freq_factor`` are divided by ``factor``, those
shorter than L / ``high_freq_factor`` are kept, and those in between are
interpolated smoothly: with s = (L / wavelength − low) / (high − low),
ω ← (1 − s) ω / factor + s ω.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import backend
from ..backend import array_module
from ..tensor import Function, Tensor
from .elementwise import mul
from .shape import concat, getitem

LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _scaling_key(scaling) -> tuple | None:
    """A Llama 3 scaling mapping as a hashable, checked tuple (factor, low, high, original length)."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "llama3"))
    if kind != "llama3":
        raise ValueError(f"rope: unsupported rope scaling type {kind!r} (supported: 'llama3')")
    missing = [key for key in LLAMA3_SCALING_KEYS if key not in scaling]
    if missing:
        raise ValueError(f"rope: llama3 scaling needs {', '.join(missing)}")
    factor, low, high, original = (float(scaling[key]) for key in LLAMA3_SCALING_KEYS)
    if factor <= 0 or low <= 0 or high <= low or original <= 0:
        raise ValueError(f"rope: llama3 scaling needs factor > 0 and 0 < low_freq_factor < high_freq_factor, "
                         f"got {dict(scaling)}")
    return factor, low, high, original


@functools.lru_cache(maxsize=32)
def _frequencies(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    omega = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # (D/2,)
    if scaling is not None:
        factor, low, high, original = scaling
        wavelength = 2 * math.pi / omega
        smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)     # 0: long, 1: short
        omega = (1 - smooth) * omega / factor + smooth * omega
    omega.flags.writeable = False
    return omega


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling=None) -> np.ndarray:
    """The D/2 angular frequencies ωᵢ = θ^(−2i/D) (float64), Llama-3-scaled if ``scaling`` is given.

    >>> rope_frequencies(4, theta=100.0).tolist()
    [1.0, 0.1]
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: the feature size must be even and positive, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope: theta must be positive, got {theta}")
    return _frequencies(int(head_dim), float(theta), _scaling_key(scaling))


def rope_tables(positions, head_dim: int, theta: float, scaling, dtype, device: str):
    """cos(mω), sin(mω) of shape positions.shape + (D/2,), in ``dtype`` on ``device``.

    The angles are formed in float64 on the host (positions up to ~10⁵ times ω up to 1
    lose nothing), then cast: the same tables for every dtype.
    """
    angles = np.asarray(positions, dtype=np.float64)[..., None] * rope_frequencies(head_dim, theta, scaling)
    return (backend.to_device(np.cos(angles).astype(dtype), device),
            backend.to_device(np.sin(angles).astype(dtype), device))


def _rotate(x, cos, sin):
    """[x₁, x₂] -> [x₁ cos − x₂ sin, x₂ cos + x₁ sin] over the last axis (halves of x)."""
    xp = array_module(x)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = xp.empty_like(x)
    xp.multiply(x1, cos, out=out[..., :half])
    out[..., :half] -= x2 * sin
    xp.multiply(x2, cos, out=out[..., half:])
    out[..., half:] += x1 * sin
    return out


class Rope(Function):
    """y = R(mω) x per feature pair (i, i + D/2).   dx = R(−mω) dy: rotate back (module docstring)."""

    float_only = True     # integer or boolean inputs: TypeError in the user's words

    def __init__(self, cos, sin):
        self.cos, self.sin = cos, sin       # (…, T, D/2), broadcast against x (…, T, D)

    def forward(self, x):
        return _rotate(x, self.cos, self.sin)

    def backward(self, grad):
        return (_rotate(grad, self.cos, -self.sin),)


def _check_rope_args(x, positions, op_name):
    if not isinstance(x, Tensor):
        raise TypeError(f"{op_name}: x must be a Tensor")
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"{op_name}: x must be (…, T, D) with D even, got shape {x.shape}")
    positions = backend.to_numpy(positions) if hasattr(positions, "device") else np.asarray(positions)
    if positions.dtype.kind not in "iu":
        raise ValueError(f"{op_name}: positions must be integers, got dtype {positions.dtype}")
    try:
        rows = np.broadcast_shapes(positions.shape, x.shape[:-1])
    except ValueError:
        rows = None
    if rows != x.shape[:-1]:                # positions may broadcast to x's rows, not beyond them
        raise ValueError(f"{op_name}: positions of shape {positions.shape} do not broadcast against "
                         f"x's rows {x.shape[:-1]} (pass (T,) or e.g. (B, 1, T) for (B, H, T, D))") from None
    return positions


def rope(x, positions, theta: float = 10000.0, scaling=None) -> Tensor:
    """Rotary position embedding of x (…, T, D) at integer ``positions`` (T,) or broadcastable to (…, T).

    ``theta`` is the base of the frequencies (Llama 3 uses 500,000); ``scaling``
    is None or Llama 3's mapping (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``; a ``rope_type``
    other than "llama3" is an error). Features i and i + D/2 form a pair, as in
    Hugging Face's Llama and Qwen3 checkpoints.
    """
    consecutive = positions if isinstance(positions, range) and positions.step == 1 else None
    positions = _check_rope_args(x, positions, "rope")
    if consecutive is not None:     # the model's case: reuse the tables of every layer and step
        cos, sin = _consecutive_tables(consecutive.start, consecutive.stop, x.shape[-1], float(theta),
                                       _scaling_key(scaling), x.dtype, x.device)
    else:
        cos, sin = rope_tables(positions, x.shape[-1], theta, scaling, x.dtype, x.device)
    return Rope.apply(x, cos=cos, sin=sin)


@functools.lru_cache(maxsize=64)
def _consecutive_tables(start, stop, head_dim, theta, scaling_key, dtype, device):
    """Cached ``rope_tables`` for positions start … stop − 1 (a ``range``); read-only on the CPU."""
    scaling = None if scaling_key is None else dict(zip(LLAMA3_SCALING_KEYS, scaling_key))
    tables = rope_tables(np.arange(start, stop), head_dim, theta, scaling, dtype, device)
    for table in tables:
        if isinstance(table, np.ndarray):
            table.flags.writeable = False
    return tables


def rope_composed(x, positions, theta: float = 10000.0, scaling=None) -> Tensor:
    """The same rotation from primitive ops (slices, products, concat): for reading; tested equal to ``rope``."""
    positions = _check_rope_args(x, positions, "rope_composed")
    cos, sin = (Tensor(table) for table in rope_tables(positions, x.shape[-1], theta, scaling, x.dtype, x.device))
    half = x.shape[-1] // 2
    x1, x2 = getitem(x, (Ellipsis, slice(0, half))), getitem(x, (Ellipsis, slice(half, None)))
    rotated_half = concat([-x2, x1], axis=-1)                  # HF's rotate_half: [−x₂, x₁]
    return mul(x, concat([cos, cos], axis=-1)) + mul(rotated_half, concat([sin, sin], axis=-1))
