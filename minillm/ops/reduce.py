"""Reductions: sum, mean, max, var over an axis (or several, or all), NumPy semantics.

The backward of a reduction spreads each output gradient back over the
elements that were reduced: re-insert the reduced axes as size 1 (so the
gradient broadcasts), then broadcast to the input's shape.
"""

from __future__ import annotations

import math

from ..backend import array_module
from ..tensor import Function, Tensor
from .common import normalize_axes


def _expand_reduced(grad, axes: tuple[int, ...], keepdims: bool):
    """Put back the reduced axes as size-1 axes so ``grad`` broadcasts against the input."""
    if keepdims:
        return grad
    xp = array_module(grad)
    return xp.expand_dims(grad, axes) if axes else grad


class Reduction(Function):
    """What every reduction shares: the axes to reduce, whether to keep them, how many elements."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def set_axes(self, x) -> None:
        self.axes = normalize_axes(self.axis, x.ndim)
        self.count = math.prod(x.shape[a] for a in self.axes)   # elements per reduced group


class Sum(Reduction):
    """z = Σ_axes x.   dz/dx = 1 for every summed element: grad broadcast back."""

    def forward(self, x):
        self.set_axes(x)
        self.save(x.shape)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, grad):
        (shape,) = self.saved
        xp = array_module(grad)
        return (xp.broadcast_to(_expand_reduced(grad, self.axes, self.keepdims), shape),)


class Mean(Reduction):
    """z = (1/n) Σ_axes x.   dz/dx = 1/n, n the number of elements reduced."""

    def forward(self, x):
        self.set_axes(x)
        self.save(x.shape)
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, grad):
        (shape,) = self.saved
        xp = array_module(grad)
        scaled = _expand_reduced(grad, self.axes, self.keepdims) * (1.0 / self.count)
        return (xp.broadcast_to(scaled, shape),)


class Max(Reduction):
    """z = max_axes x.   dz/dx = 1 where x equals the max (split evenly between ties), else 0."""

    def forward(self, x):
        self.set_axes(x)
        if self.count == 0:                        # (NumPy: (0, 3).max(axis=1) is fine, axis=0 is not)
            raise ValueError("max over an empty axis (no elements to take the maximum of)")
        out = x.max(axis=self.axes, keepdims=True)
        self.save(x, out)
        return out if self.keepdims else out.squeeze(self.axes) if self.axes else out

    def backward(self, grad):
        x, out = self.saved
        is_max = (x == out).astype(grad.dtype)
        is_max /= is_max.sum(axis=self.axes, keepdims=True)
        return (is_max * _expand_reduced(grad, self.axes, self.keepdims),)


class Var(Reduction):
    """z = (1/n) Σ (x − μ)², ddof = 0 like NumPy.   dz/dx = (2/n)(x − μ)."""

    def forward(self, x):
        self.set_axes(x)
        centered = x - x.mean(axis=self.axes, keepdims=True)
        self.save(centered)
        return (centered * centered).mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, grad):
        (centered,) = self.saved
        return (centered * ((2.0 / self.count) * _expand_reduced(grad, self.axes, self.keepdims)),)


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def max(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    """The values of the maximum (like NumPy's ``max``, not PyTorch's (values, indices))."""
    return Max.apply(x, axis=axis, keepdims=keepdims)


def var(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return Var.apply(x, axis=axis, keepdims=keepdims)
