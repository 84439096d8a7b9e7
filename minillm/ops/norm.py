"""Normalisation over the last axis: layer_norm and rms_norm, each one fused op.

Layer norm. For a row x of C features (any leading shape, N rows in all):

    μ = mean(x),   σ² = mean((x - μ)²),   r = 1/√(σ² + ε)      (one per row)
    x̂ = (x - μ) r,   y = x̂ ⊙ w + b                             w, b: (C,)

Backward, with g = dL/dy and g_w = g ⊙ w:

    dL/db = Σ_rows g,   dL/dw = Σ_rows g ⊙ x̂
    dL/dx = r · (g_w - mean(g_w) - x̂ ⊙ mean(g_w ⊙ x̂))                 (per row)

because dx̂_i/dx_j = r (δ_ij - 1/C - x̂_i x̂_j / C): moving x_j moves the mean
(the -1/C) and the spread (the -x̂_i x̂_j/C). docs/autograd.md (section 7)
has the derivation in full.

RMS norm drops the centring: r = 1/√(mean(x²) + ε), x̂ = x r, y = x̂ ⊙ w, and

    dL/dx = r · (g_w - x̂ ⊙ mean(g_w ⊙ x̂)),   dL/dw = Σ_rows g ⊙ x̂.

Both ops save x (which stays alive anyway as the op's input) and the per-row
statistics, never an (N, C) intermediate, and rebuild x̂ in the backward.
On a GPU, layer norm is one CUDA kernel forward (one block per row) and one
kernel plus one small reduction backward. On the CPU both norms are C++ row
loops (``kernels/norm.py``, rows shared out between threads) when the CPU
kernels are on and the arrays are C-contiguous float32/float64; otherwise, and
on a GPU for RMS norm, the array passes below run (NumPy: in row blocks).
"""

from __future__ import annotations

import numpy as np

from ..kernels import norm as kernels
from ..backend import array_module
from ..tensor import Function, Tensor
from .common import row_ranges, run_parallel


# Elements per block of rows: the backward's, whose passes use four (N, C) arrays (x, g, dx, x̂):
# 4 MB of float32 together. The forward's use two (x, y): blocks twice as large, the same bytes.
# (One size for both, 1 << 18, had the forward of (8, 256, 384) in 2 threads run as blocks of
# 682 and 342 rows per thread; in the training step, alternating step by step, 15 each (load
# ~1.5): forward 15.6 -> 13.8 ms with 1 << 19, while the backward went 26.4 -> 26.7 ms with it.)
_BLOCK_ELEMENTS = 1 << 18


def _row_blocks(n_rows: int, n_cols: int, xp, block_elements: int):
    """Slices of consecutive rows, about ``block_elements`` elements each.

    Layer norm makes about six elementwise passes forward and ten backward.
    On a CPU, making all of them over one block while it sits in cache, then
    moving on, reads main memory once instead of every pass (~1.5x faster for
    (8192, 768)). On a GPU every pass is a kernel launch, so one block.
    """
    step = max(1, block_elements // max(n_cols, 1)) if xp is np else max(n_rows, 1)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _thread_ranges(n_rows: int, n_cols: int, xp) -> list[slice]:
    """On the CPU, one range of rows per thread (``run_parallel``); on a GPU all rows at once."""
    return row_ranges(n_rows, n_cols) if xp is np else [slice(0, n_rows)]


def _row_sum(a):
    """Σ over the last axis, keepdims: (..., C) -> (..., 1). Written as a product with a vector
    of ones, which NumPy hands to BLAS: ~3x faster than ``a.sum(axis=-1)`` for rows of ~1000."""
    xp = array_module(a)
    return (a @ xp.ones(a.shape[-1], dtype=a.dtype))[..., None]


def _column_sum(a):
    """Σ over the rows of a (N, C) array -> (C,): ones @ a, again through BLAS (~2x ``a.sum(axis=0)``)."""
    xp = array_module(a)
    return xp.ones(a.shape[0], dtype=a.dtype) @ a


def _row_dot(a, b):
    """Σ over the last axis of a ⊙ b, keepdims: (..., C) -> (..., 1), no (..., C) temporary."""
    xp = array_module(a)
    if hasattr(xp, "vecdot"):
        return xp.vecdot(a, b)[..., None]
    return xp.einsum("...c,...c->...", a, b)[..., None]


def _column_dot(a, b):
    """Σ over all rows of a ⊙ b: (..., C), (..., C) -> (C,), no (..., C) temporary."""
    xp = array_module(a)
    c = a.shape[-1]
    return xp.einsum("nc,nc->c", a.reshape(-1, c), b.reshape(-1, c))


class LayerNorm(Function):
    """y = (x - μ) / √(σ² + ε) ⊙ w + b over the last axis; see the module docstring."""

    float_only = True

    def __init__(self, eps: float = 1e-5):
        self.eps = float(eps)

    def forward(self, x, weight, bias=None):
        self.fused = kernels.layer_norm_fusable(x, weight, bias)   # the backward follows this choice
        if self.fused:
            out, mean, rstd = kernels.layer_norm_forward(x, weight, bias, self.eps)
            self.save(x, weight, mean, rstd)
            return out
        xp = array_module(x)
        n_features = x.shape[-1]
        rows = x.reshape(-1, n_features)                          # (N, C)
        out = xp.empty(x.shape, dtype=x.dtype)                    # owns its memory (not a view)
        out_rows = out.reshape(-1, n_features)
        mean = xp.empty((rows.shape[0], 1), dtype=x.dtype)         # (N, 1)
        rstd = xp.empty((rows.shape[0], 1), dtype=x.dtype)         # (N, 1)

        def normalize(part):                                      # rows part.start .. part.stop - 1
            for block in _row_blocks(part.stop - part.start, n_features, xp, 2 * _BLOCK_ELEMENTS):
                block = slice(part.start + block.start, part.start + block.stop)
                x_block, y = rows[block], out_rows[block]
                mu = _row_sum(x_block)
                mu *= 1.0 / n_features                                # μ
                xp.subtract(x_block, mu, out=y)                       # x - μ
                r = _row_dot(y, y)
                r *= 1.0 / n_features                                 # σ²
                r += self.eps
                xp.sqrt(r, out=r)
                xp.divide(1.0, r, out=r)                              # r = 1/√(σ² + ε)
                y *= r                                                # x̂
                y *= weight
                if bias is not None:
                    y += bias                                         # y = x̂ w + b
                mean[block], rstd[block] = mu, r

        run_parallel(normalize, _thread_ranges(rows.shape[0], n_features, xp))
        self.save(x, weight, mean, rstd)
        return out

    def backward(self, grad):
        x, weight, mean, rstd = self.saved
        has_bias = len(self.needs_input_grad) == 3                # layer_norm(x, w) passes no bias
        if self.fused:
            grad_x, grad_w, grad_b = kernels.layer_norm_backward(grad, x, weight, mean, rstd)
        else:
            grad_x, grad_w, grad_b = self._backward_array(grad, x, weight, mean, rstd)
        if not has_bias:
            return grad_x, grad_w
        return grad_x, grad_w, grad_b

    @staticmethod
    def _backward_array(grad, x, weight, mean, rstd):
        xp = array_module(x)
        n_features = x.shape[-1]
        inv_c = 1.0 / n_features
        rows = x.reshape(-1, n_features)                          # (N, C)
        grad_rows = grad.reshape(-1, n_features)                  # (N, C)
        grad_x = xp.empty(x.shape, dtype=x.dtype)
        grad_x_rows = grad_x.reshape(-1, n_features)

        def backward_rows(part):                                  # rows part.start .. part.stop - 1
            grad_w = xp.zeros(n_features, dtype=x.dtype)
            grad_b = xp.zeros(n_features, dtype=x.dtype)
            blocks = list(_row_blocks(part.stop - part.start, n_features, xp, _BLOCK_ELEMENTS))
            block_rows = blocks[0].stop - blocks[0].start if blocks else 0
            x_hat_buffer = xp.empty((block_rows, n_features), dtype=x.dtype)
            for block in blocks:
                block = slice(part.start + block.start, part.start + block.stop)
                g, dx, r = grad_rows[block], grad_x_rows[block], rstd[block]
                x_hat = x_hat_buffer[: g.shape[0]]
                xp.subtract(rows[block], mean[block], out=x_hat)
                x_hat *= r                                        # x̂, rebuilt
                grad_w += _column_dot(g, x_hat)                   # Σ g x̂
                grad_b += _column_sum(g)                          # Σ g
                g_w = xp.multiply(g, weight, out=dx)              # g_w = g w
                mean_g_w = _row_sum(g_w)
                mean_g_w *= inv_c                                 # mean(g_w)          (R, 1)
                mean_g_w_x_hat = _row_dot(g_w, x_hat)
                mean_g_w_x_hat *= inv_c                           # mean(g_w x̂)       (R, 1)
                x_hat *= mean_g_w_x_hat
                g_w -= x_hat
                g_w -= mean_g_w
                g_w *= r                                          # dx = r (g_w - mean(g_w) - x̂ mean(g_w x̂))
            return grad_w, grad_b

        partials = run_parallel(backward_rows, _thread_ranges(rows.shape[0], n_features, xp))
        grad_w, grad_b = partials[0]
        for more_w, more_b in partials[1:]:                       # each thread summed its own rows
            grad_w += more_w
            grad_b += more_b
        return grad_x, grad_w, grad_b


class RMSNorm(Function):
    """y = x / √(mean(x²) + ε) ⊙ w over the last axis; see the module docstring."""

    float_only = True

    def __init__(self, eps: float = 1e-6):
        self.eps = float(eps)

    def forward(self, x, weight):
        self.fused = kernels.rms_norm_fusable(x, weight)           # the backward follows this choice
        if self.fused:
            out, rstd = kernels.rms_norm_forward(x, weight, self.eps)
            self.save(x, weight, rstd)
            return out
        xp = array_module(x)
        rstd = _row_dot(x, x)
        rstd *= 1.0 / x.shape[-1]
        rstd += self.eps
        xp.sqrt(rstd, out=rstd)
        xp.divide(1.0, rstd, out=rstd)                      # r = 1/√(mean(x²) + ε)   (..., 1)
        out = x * rstd
        out *= weight                                       # y = x r w
        self.save(x, weight, rstd)
        return out

    def backward(self, grad):
        x, weight, rstd = self.saved
        if self.fused:
            grad_x, grad_w = kernels.rms_norm_backward(grad, x, weight, rstd)
            return (grad_x if self.needs_input_grad[0] else None,
                    grad_w if self.needs_input_grad[1] else None)
        x_hat = x * rstd                                    # (..., C)
        grad_w = _column_dot(grad, x_hat) if self.needs_input_grad[1] else None
        grad_x = None
        if self.needs_input_grad[0]:
            g_w = grad * weight
            mean_g_w_x_hat = _row_dot(g_w, x_hat)
            mean_g_w_x_hat *= 1.0 / x.shape[-1]             # mean(g_w x̂)     (..., 1)
            x_hat *= mean_g_w_x_hat
            g_w -= x_hat
            g_w *= rstd                                     # r (g_w - x̂ mean(g_w x̂))
            grad_x = g_w
        return grad_x, grad_w


def _check_norm_args(name: str, x: Tensor, weight, bias=None) -> None:
    for label, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        shape = p.shape if hasattr(p, "shape") else None
        if shape != (x.shape[-1],):
            raise ValueError(f"{name}: {label} must have shape ({x.shape[-1]},) to match x of shape "
                             f"{x.shape}, got {shape}")


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Layer normalisation over the last axis: (x - mean) / √(var + eps) · weight + bias."""
    _check_norm_args("layer_norm", x, weight, bias)
    if bias is None:
        return LayerNorm.apply(x, weight, eps=eps)
    return LayerNorm.apply(x, weight, bias, eps=eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMS normalisation over the last axis: x / √(mean(x²) + eps) · weight."""
    _check_norm_args("rms_norm", x, weight)
    return RMSNorm.apply(x, weight, eps=eps)


# ================================================================ composed from primitives


def layer_norm_composed(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Layer norm from primitives (mean, var, sqrt, ...): autograd derives the backward."""
    mean = x.mean(axis=-1, keepdims=True)
    variance = x.var(axis=-1, keepdims=True)
    x_hat = (x - mean) / (variance + eps).sqrt()
    out = x_hat * weight
    return out if bias is None else out + bias


def rms_norm_composed(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMS norm from primitives: x / √(mean(x²) + eps) · weight."""
    return x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt() * weight
