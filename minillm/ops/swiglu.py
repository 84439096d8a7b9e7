"""SwiGLU, the gated MLP activation of Llama and Qwen: one fused op and its composed twin.

The MLP computes two projections of the same input, a gate a = x W_gate and a
value b = x W_up (both (…, H)), and keeps b where the gate opens:

    y = silu(a) ⊙ b,    silu(a) = a σ(a),   σ(a) = 1 / (1 + e⁻ᵃ)

The fused op takes the two projections packed side by side, h = [a | b]
(…, 2H) — one GEMM with the packed weight [W_gate; W_up] produces it — and
returns y (…, H). Backward, with g = dL/dy:

    db = g ⊙ silu(a)
    da = g ⊙ b ⊙ silu′(a),   silu′(a) = σ(a) + a σ(a)(1 − σ(a)) = σ(a) (1 + a (1 − σ(a)))

returned packed as [da | db] (…, 2H), the shape of h. It saves only h (the
op's input, alive anyway) and recomputes σ(a) in backward.

``swiglu_composed`` is the same function from primitives (two slices, silu,
a product); the tests check the two agree, values and gradients.
"""

from __future__ import annotations

from ..backend import array_module
from ..tensor import Function, Tensor
from .activation import _sigmoid_array, silu
from .shape import getitem


class SwiGLU(Function):
    """y = silu(a) ⊙ b for h = [a | b] (…, 2H) -> (…, H); backward in the module docstring."""

    float_only = True     # integer or boolean inputs: TypeError in the user's words

    def forward(self, h):
        half = h.shape[-1] // 2
        a, b = h[..., :half], h[..., half:]
        self.save(h)
        out = a * _sigmoid_array(a)              # silu(a)
        out *= b
        return out

    def backward(self, grad):
        (h,) = self.saved
        xp = array_module(h)
        half = h.shape[-1] // 2
        a, b = h[..., :half], h[..., half:]
        s = _sigmoid_array(a)                    # σ(a)
        grad_h = xp.empty_like(h)
        grad_a, grad_b = grad_h[..., :half], grad_h[..., half:]
        xp.multiply(a, s, out=grad_b)            # silu(a)
        grad_b *= grad                           # db = g ⊙ silu(a)
        xp.subtract(1.0, s, out=grad_a)          # 1 − σ
        grad_a *= a
        grad_a += 1.0
        grad_a *= s                              # silu′(a) = σ (1 + a (1 − σ))
        grad_a *= b
        grad_a *= grad                           # da = g ⊙ b ⊙ silu′(a)
        return (grad_h,)


def _check(h, op_name):
    if not isinstance(h, Tensor):
        raise TypeError(f"{op_name}: input must be a Tensor")
    if h.ndim < 1 or h.shape[-1] % 2:
        raise ValueError(f"{op_name}: the last axis holds [gate | up] and must be even, got shape {h.shape}")


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) ⊙ up for h = [gate | up] packed on the last axis (…, 2H) -> (…, H); fused."""
    _check(h, "swiglu")
    return SwiGLU.apply(h)


def swiglu_composed(h: Tensor) -> Tensor:
    """The same from primitive ops: slice the halves, silu the gate, multiply."""
    _check(h, "swiglu_composed")
    half = h.shape[-1] // 2
    gate, up = getitem(h, (Ellipsis, slice(0, half))), getitem(h, (Ellipsis, slice(half, None)))
    return silu(gate) * up
