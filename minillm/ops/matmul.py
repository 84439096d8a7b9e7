"""Matrix products: batched, broadcasting ``matmul`` and the fused ``linear`` layer op.

For Z = A @ B (last two axes are the matrices, leading axes broadcast):

    dL/dA = dL/dZ @ Bᵀ        (…, m, n) @ (…, n, k) -> (…, m, k)
    dL/dB = Aᵀ @ dL/dZ        (…, k, m) @ (…, m, n) -> (…, k, n)

with A (…, m, k), B (…, k, n), Z (…, m, n); broadcast batch axes are summed
back with ``unbroadcast``. A 1-D operand is treated as a row (A) or column (B)
vector, as NumPy does, and the added axis is removed again.
"""

from __future__ import annotations

from ..tensor import Function, Tensor
from .common import unbroadcast


def _swap_last(x):
    return x.swapaxes(-1, -2)


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
        self.save(a, b)
        return a @ b

    def backward(self, grad):
        a, b = self.saved
        a2 = a[None, :] if a.ndim == 1 else a          # (…, m, k)
        b2 = b[:, None] if b.ndim == 1 else b          # (…, k, n)
        g = grad
        if b.ndim == 1:
            g = g[..., None]
        if a.ndim == 1:
            g = g[..., None, :]                        # (…, m, n)
        grad_a = grad_b = None
        if self.needs_input_grad[0]:
            grad_a = unbroadcast(g @ _swap_last(b2), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            grad_b = unbroadcast(_swap_last(a2) @ g, b2.shape).reshape(b.shape)
        return grad_a, grad_b


class Linear(Function):
    """y = x @ Wᵀ + b with W (out, in) like PyTorch; x (…, in), y (…, out).

    All leading axes are folded into one so each gradient is a single GEMM:
        dx = dy @ W                       (N, out) @ (out, in) -> (N, in)
        dW = dyᵀ @ x                      (out, N) @ (N, in)   -> (out, in)
        db = Σ_N dy                       (out,)
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
        self.save(x, weight)
        self.has_bias = bias is not None
        x2d = x.reshape(-1, x.shape[-1])                    # (N, in)
        y = x2d @ weight.T                                  # (N, out)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, grad):
        x, weight = self.saved
        grad2d = grad.reshape(-1, grad.shape[-1])           # (N, out)
        grad_x = grad_w = grad_b = None
        if self.needs_input_grad[0]:
            grad_x = (grad2d @ weight).reshape(x.shape)
        if self.needs_input_grad[1]:
            grad_w = grad2d.T @ x.reshape(-1, x.shape[-1])
        if self.has_bias and self.needs_input_grad[2]:
            grad_b = grad2d.sum(axis=0)
        return (grad_x, grad_w, grad_b) if self.has_bias else (grad_x, grad_w)


def matmul(a, b) -> Tensor:
    return MatMul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)
