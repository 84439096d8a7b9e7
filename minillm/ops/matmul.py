"""Matrix products: batched, broadcasting ``matmul`` and the fused ``linear`` layer op.

For Z = A @ B (last two axes are the matrices, leading axes broadcast):

    dL/dA = dL/dZ @ Bᵀ        (…, m, n) @ (…, n, k) -> (…, m, k)
    dL/dB = Aᵀ @ dL/dZ        (…, k, m) @ (…, m, n) -> (…, k, n)

with A (…, m, k), B (…, k, n), Z (…, m, n); broadcast batch axes are summed
back with ``unbroadcast``. A 1-D operand is treated as a row (A) or column (B)
vector, as NumPy does, and the added axis is removed again.

Every product here goes through ``_product(a, b, trans_a, trans_b)``: NumPy's
``@`` on the CPU; on a GPU one cuBLAS call (``minillm/kernels/matmul.py``) that
reads a transposed operand in place (a flag, not a copy: CuPy's ``matmul``
copies a transposed view, and sends 3-D products down a slower path), runs
float32 on TF32 tensor cores after ``mm.set_float32_matmul_precision("high")``,
and, under ``mm.autocast``, multiplies bf16/fp16 operands with float32
accumulation and a float32 result. Under autocast both ops save their cast
operands, so backward runs in the same precision and the gradients of float32
inputs come back float32.
"""

from __future__ import annotations

import math

import numpy as np

from .. import precision
from ..kernels.matmul import matmul as _gpu_matmul
from ..kernels.matmul import tensor_core_width, zero_padded
from ..tensor import Function, Tensor
from .common import cpu_matmul, cpu_matmul_pair, unbroadcast


def _product(a, b, trans_a: bool = False, trans_b: bool = False, out_dtype=None):
    """op(a) @ op(b), op = transpose of the last two axes where asked; batch axes broadcast.

    On a GPU the result has ``out_dtype`` (default a's dtype): bf16 operands can give float32.
    """
    if isinstance(a, np.ndarray):   # 2-D products shared out between the CPU's threads
        return cpu_matmul(a.swapaxes(-1, -2) if trans_a else a, b.swapaxes(-1, -2) if trans_b else b)
    return _gpu_matmul(a, b, trans_a, trans_b, out_dtype=out_dtype, tf32=precision.tf32_enabled())


def _as_grad_operand(grad, saved):
    """The incoming gradient in the dtype the forward product ran in (bf16/fp16 under autocast)."""
    return grad if grad.dtype == saved.dtype else grad.astype(saved.dtype)


class MatMul(Function):
    """Z = A @ B.   dA = dZ @ Bᵀ,  dB = Aᵀ @ dZ (then summed over broadcast batch axes)."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError("matmul: both operands need at least one dimension (use * for scalars)")
        k_a = a.shape[-1]
        k_b = b.shape[-2] if b.ndim > 1 else b.shape[0]
        if k_a != k_b:
            raise ValueError(
                f"matmul: shapes {a.shape} and {b.shape} do not align: "
                f"{k_a} (last axis of the first) != {k_b} (second-to-last of the second)"
            )
        self.out_dtype = a.dtype
        a, b = precision.autocast_operands(a, b)       # bf16/fp16 copies under autocast
        self.save(a, b)
        if isinstance(a, np.ndarray):
            return a @ b
        z = _product(a[None, :] if a.ndim == 1 else a, b[:, None] if b.ndim == 1 else b, out_dtype=self.out_dtype)
        if a.ndim == 1:
            z = z[..., 0, :]                           # drop the added row axis (…, 1, n) first,
        if b.ndim == 1:
            z = z[..., 0]                              # then the added column axis
        return z

    def backward(self, grad):
        a, b = self.saved
        a2 = a[None, :] if a.ndim == 1 else a          # (…, m, k)
        b2 = b[:, None] if b.ndim == 1 else b          # (…, k, n)
        g = _as_grad_operand(grad, a)
        if b.ndim == 1:
            g = g[..., None]
        if a.ndim == 1:
            g = g[..., None, :]                        # (…, m, n)
        grad_a = grad_b = None
        if self.needs_input_grad[0]:                   # dZ @ Bᵀ
            grad_a = unbroadcast(_product(g, b2, trans_b=True, out_dtype=self.out_dtype), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:                   # Aᵀ @ dZ
            grad_b = unbroadcast(_product(a2, g, trans_a=True, out_dtype=self.out_dtype), b2.shape).reshape(b.shape)
        return grad_a, grad_b


class Linear(Function):
    """y = x @ Wᵀ + b with W (out, in) like PyTorch; x (…, in), y (…, out).

    All leading axes are folded into one so each gradient is a single GEMM:
        dx = dy @ W                       (N, out) @ (out, in) -> (N, in)
        dW = dyᵀ @ x                      (out, N) @ (N, in)   -> (out, in)
        db = Σ_N dy                       (out,)

    On a GPU's tensor cores (16 bits, or TF32), an ``out`` that is not a multiple of 8 (GPT-2's
    vocabulary) is multiplied
    as if W had zero rows up to the next multiple (dy zero columns): cuBLAS's tensor-core kernels
    need 16-byte-aligned rows (kernels/matmul.py, ``tensor_core_width``); y is a view of the real
    columns, and the padding's rows are dropped from dW.
    """

    def forward(self, x, weight, bias=None):
        if weight.ndim != 2:
            raise ValueError(f"linear: weight must be 2-D (out, in), got shape {weight.shape}")
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"linear: input has {x.shape[-1]} features (shape {x.shape}) "
                f"but weight expects {weight.shape[1]} (weight shape {weight.shape})"
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"linear: bias shape {bias.shape} != ({weight.shape[0]},)")
        self.has_bias = bias is not None
        self.x_shape, self.out_dtype = x.shape, x.dtype
        x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])              # (N, in) (not -1: in may be 0)
        out = weight.shape[0]
        padded = out
        if not isinstance(x2d, np.ndarray):      # tensor cores (16 bits, TF32) want rows 8-aligned: out % 8
            cast = precision.autocast_dtype() if weight.dtype == np.float32 else None
            padded = tensor_core_width(out, cast or weight.dtype, precision.tf32_enabled())
        if padded != out:                        # cast (under autocast) and pad in one pass: (out_p, in)
            weight = zero_padded(weight, rows=padded, dtype=cast)
        x2d, weight = precision.autocast_operands(x2d, weight)              # (N, in), (out or out_p, in)
        self.save(x2d, weight)
        if isinstance(x2d, np.ndarray):                                    # CPU: each thread adds the
            y = cpu_matmul(x2d, weight.swapaxes(-1, -2), bias)             # bias to its block of y
        else:
            y = _product(x2d, weight, trans_b=True, out_dtype=self.out_dtype)   # (N, out) or (N, out_p)
            if padded != out:
                y = y[:, :out]                                             # a view: rows padded_out apart
            if bias is not None:
                y += bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def backward(self, grad):
        x2d, weight = self.saved
        grad2d = grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1])   # (N, out)
        out = grad2d.shape[1]
        if weight.shape[0] != out:                          # the forward's padded product: dy padded too
            g = zero_padded(grad2d, columns=weight.shape[0], dtype=weight.dtype)
        else:
            g = _as_grad_operand(grad2d, weight)
        grad_x = grad_w = grad_b = None
        want_bias = self.has_bias and self.needs_input_grad[2]
        if self.needs_input_grad[0] and self.needs_input_grad[1] and isinstance(g, np.ndarray):
            # CPU: the two products at once, Σ_N dy (db) on dx's thread after its product
            grad_x, grad_w, *grad_b = cpu_matmul_pair((g, weight), (g.T, x2d), grad2d if want_bias else None)
            grad_x, grad_b = grad_x.reshape(self.x_shape), (grad_b[0] if grad_b else None)
        if self.needs_input_grad[0] and grad_x is None:
            grad_x = _product(g, weight, out_dtype=self.out_dtype).reshape(self.x_shape)   # dy @ W
        if self.needs_input_grad[1] and grad_w is None:
            grad_w = _product(g, x2d, trans_a=True, out_dtype=self.out_dtype)              # dyᵀ @ x
            if grad_w.shape[0] != out:
                grad_w = grad_w[:out]                                                      # the padding's rows off
        if want_bias and grad_b is None:
            grad_b = _column_sum(grad2d)                                               # Σ_N dy
        return (grad_x, grad_w, grad_b) if self.has_bias else (grad_x, grad_w)


def _column_sum(a):
    """Σ over the rows of a (N, C) array -> (C,). On a GPU as the product ones(N) @ a: one cuBLAS
    GEMV streaming ``a`` once in row order (CuPy's ``sum(axis=0)`` is a reduction across rows,
    a strided pattern), in the array's own precision (never TF32: a sum, not a product of data)."""
    if isinstance(a, np.ndarray):
        return a.sum(axis=0)
    import cupy  # noqa: PLC0415

    ones = cupy.ones((1, a.shape[0]), dtype=a.dtype)
    return _gpu_matmul(ones, a, out_dtype=a.dtype)[0]


def matmul(a, b) -> Tensor:
    return MatMul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)
