"""Elementwise ops: arithmetic, exp/log/tanh/sqrt/abs, maximum/minimum, where, clip.

Binary ops broadcast like NumPy; their backward sums each gradient back to its
input's shape with the shared ``unbroadcast``. Python numbers are lifted to
constants of the tensor's dtype.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import array_module
from ..tensor import Function, Tensor
from .common import cpu_add, unbroadcast


class Add(Function):
    """z = a + b.   dz/da = 1, dz/db = 1, so both get ``grad`` (unbroadcast)."""

    def forward(self, a, b):
        self.save(a.shape, b.shape)
        return cpu_add(a, b) if isinstance(a, np.ndarray) else a + b

    def backward(self, grad):
        a_shape, b_shape = self.saved
        return unbroadcast(grad, a_shape), unbroadcast(grad, b_shape)


class Sub(Function):
    """z = a - b.   dz/da = 1, dz/db = -1."""

    def forward(self, a, b):
        self.save(a.shape, b.shape)
        return a - b

    def backward(self, grad):
        a_shape, b_shape = self.saved
        grad_b = -unbroadcast(grad, b_shape) if self.needs_input_grad[1] else None
        return unbroadcast(grad, a_shape), grad_b


class Mul(Function):
    """z = a * b.   dz/da = b, dz/db = a."""

    def forward(self, a, b):
        self.save(a, b)
        return a * b

    def backward(self, grad):
        a, b = self.saved
        grad_a = unbroadcast(grad * b, a.shape) if self.needs_input_grad[0] else None
        grad_b = unbroadcast(grad * a, b.shape) if self.needs_input_grad[1] else None
        return grad_a, grad_b


class Div(Function):
    """z = a / b.   dz/da = 1/b, dz/db = -a/b² = -z/b."""

    def forward(self, a, b):
        out = a / b
        self.save(b, out, a.shape)
        return out

    def backward(self, grad):
        b, out, a_shape = self.saved
        grad_over_b = grad / b
        grad_a = unbroadcast(grad_over_b, a_shape) if self.needs_input_grad[0] else None
        grad_b = unbroadcast(-grad_over_b * out, b.shape) if self.needs_input_grad[1] else None
        return grad_a, grad_b


class Neg(Function):
    """z = -a.   dz/da = -1."""

    def forward(self, a):
        return -a

    def backward(self, grad):
        return (-grad,)


class PowScalar(Function):
    """z = a ** p for a constant p.   dz/da = p · a^(p-1).

    Small integer powers are written as products: ``x ** 3`` through ``pow``
    is ~300x slower than ``x * x * x`` in NumPy.
    """

    def __init__(self, exponent: float):
        self.exponent = float(exponent)

    @staticmethod
    def _power(a, p: float):
        if p == 2.0:
            return a * a
        if p == 3.0:
            return a * a * a
        if p == 1.0:
            return a.copy()
        if p == 0.5:
            return array_module(a).sqrt(a)
        if p == -1.0:
            return 1.0 / a
        return array_module(a).power(a, a.dtype.type(p))

    def forward(self, a):
        self.save(a)
        return self._power(a, self.exponent)

    def backward(self, grad):
        (a,) = self.saved
        p = self.exponent
        return (grad * (p * self._power(a, p - 1.0)),)


class Pow(Function):
    """z = a ** b, both tensors.   dz/da = b · a^(b-1),  dz/db = z · log(a)."""

    def forward(self, a, b):
        out = array_module(a).power(a, b)
        self.save(a, b, out)
        return out

    def backward(self, grad):
        a, b, out = self.saved
        xp = array_module(a)
        grad_a = unbroadcast(grad * b * xp.power(a, b - 1), a.shape) if self.needs_input_grad[0] else None
        grad_b = unbroadcast(grad * out * xp.log(a), b.shape) if self.needs_input_grad[1] else None
        return grad_a, grad_b


class Exp(Function):
    """z = exp(a).   dz/da = exp(a) = z, so the output is saved."""

    def forward(self, a):
        out = array_module(a).exp(a)
        self.save(out)
        return out

    def backward(self, grad):
        (out,) = self.saved
        return (grad * out,)


class Log(Function):
    """z = log(a).   dz/da = 1/a."""

    def forward(self, a):
        self.save(a)
        return array_module(a).log(a)

    def backward(self, grad):
        (a,) = self.saved
        return (grad / a,)


class Tanh(Function):
    """z = tanh(a).   dz/da = 1 - tanh(a)² = 1 - z²."""

    def forward(self, a):
        out = array_module(a).tanh(a)
        self.save(out)
        return out

    def backward(self, grad):
        (out,) = self.saved
        return (grad * (1 - out * out),)


class Sqrt(Function):
    """z = √a.   dz/da = 1 / (2√a) = 1 / (2z)."""

    def forward(self, a):
        out = array_module(a).sqrt(a)
        self.save(out)
        return out

    def backward(self, grad):
        (out,) = self.saved
        return (grad / (2 * out),)


class Abs(Function):
    """z = |a|.   dz/da = sign(a) (0 at a = 0, the subgradient NumPy's sign gives)."""

    def forward(self, a):
        self.save(a)
        return array_module(a).abs(a)

    def backward(self, grad):
        (a,) = self.saved
        return (grad * array_module(a).sign(a),)


class Maximum(Function):
    """z = max(a, b) elementwise. The gradient goes to the larger input; on a tie
    it is split evenly (so d/da max(a, a) = 1, as for a + a scaled by 1/2 each)."""

    def forward(self, a, b):
        xp = array_module(a)
        self.save(a, b)
        return xp.maximum(a, b)

    def backward(self, grad):
        a, b = self.saved
        share_a = (a > b) + 0.5 * (a == b)  # 1 where a wins, 1/2 on ties, 0 elsewhere
        share_a = share_a.astype(grad.dtype)
        grad_a = unbroadcast(grad * share_a, a.shape) if self.needs_input_grad[0] else None
        grad_b = unbroadcast(grad * (1 - share_a), b.shape) if self.needs_input_grad[1] else None
        return grad_a, grad_b


class Where(Function):
    """z = cond ? a : b (cond a constant boolean array).  dz/da = cond, dz/db = ¬cond."""

    def __init__(self, condition):
        self.condition = condition

    def forward(self, a, b):
        self.save(a.shape, b.shape)
        return array_module(a).where(self.condition, a, b)

    def backward(self, grad):
        a_shape, b_shape = self.saved
        xp = array_module(grad)
        zero = grad.dtype.type(0)
        grad_a = unbroadcast(xp.where(self.condition, grad, zero), a_shape) if self.needs_input_grad[0] else None
        grad_b = unbroadcast(xp.where(self.condition, zero, grad), b_shape) if self.needs_input_grad[1] else None
        return grad_a, grad_b


class Clip(Function):
    """z = min(max(a, lo), hi).  dz/da = 1 inside [lo, hi], 0 where clipped."""

    def __init__(self, low=None, high=None):
        self.low, self.high = low, high

    def forward(self, a):
        self.save(a)
        return array_module(a).clip(a, self.low, self.high)

    def backward(self, grad):
        (a,) = self.saved
        inside = array_module(a).ones(a.shape, dtype=bool)
        if self.low is not None:
            inside &= a >= self.low
        if self.high is not None:
            inside &= a <= self.high
        return (grad * inside,)


class Cast(Function):
    """z = a converted to another float dtype.  dz/da = 1, cast back."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def forward(self, a):
        self.source_dtype = a.dtype
        return a.astype(self.dtype)

    def backward(self, grad):
        return (grad.astype(self.source_dtype),)


class ToDevice(Function):
    """z = a copied to another device.  dz/da = grad copied back."""

    def __init__(self, device: str):
        self.device = device

    def forward(self, a):
        self.source_device = backend.device_of(a)
        return backend.to_device(a, self.device)

    def backward(self, grad):
        return (backend.to_device(grad, self.source_device),)


# ------------------------------------------------------------ public functions


def add(a, b) -> Tensor:
    return Add.apply(a, b)


def sub(a, b) -> Tensor:
    return Sub.apply(a, b)


def mul(a, b) -> Tensor:
    return Mul.apply(a, b)


def div(a, b) -> Tensor:
    return Div.apply(a, b)


def neg(a) -> Tensor:
    return Neg.apply(a)


def pow(a, exponent) -> Tensor:
    """``a ** exponent``; a constant exponent takes the fast, product-based path."""
    if isinstance(exponent, (int, float)) and isinstance(a, Tensor):
        return PowScalar.apply(a, exponent=exponent)
    return Pow.apply(a, exponent)


def exp(a) -> Tensor:
    return Exp.apply(a)


def log(a) -> Tensor:
    return Log.apply(a)


def tanh(a) -> Tensor:
    return Tanh.apply(a)


def sqrt(a) -> Tensor:
    return Sqrt.apply(a)


def abs(a) -> Tensor:
    return Abs.apply(a)


def maximum(a, b) -> Tensor:
    return Maximum.apply(a, b)


def minimum(a, b) -> Tensor:
    """min(a, b) = -max(-a, -b): a composition, so it needs no backward of its own."""
    return neg(maximum(neg(a) if isinstance(a, Tensor) else -np.asarray(a),
                       neg(b) if isinstance(b, Tensor) else -np.asarray(b)))


def where(condition, a, b) -> Tensor:
    """Elementwise ``condition ? a : b``; ``condition`` is a boolean array or tensor (no gradient)."""
    cond = condition.data if isinstance(condition, Tensor) else condition
    reference = a if isinstance(a, Tensor) else b
    if not isinstance(reference, Tensor):
        raise TypeError("where: a or b must be a Tensor")
    cond = array_module(reference.data).asarray(cond).astype(bool)
    return Where.apply(a, b, condition=cond)


def clip(a, min=None, max=None) -> Tensor:
    """Clamp into [min, max] (either bound may be None)."""
    if min is None and max is None:
        raise ValueError("clip: give at least one of min and max")
    return Clip.apply(a, low=min, high=max)
