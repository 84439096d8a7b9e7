"""Helpers shared by every op family."""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor


def unbroadcast(grad, shape: tuple[int, ...]):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting.

    If ``x`` of shape ``shape`` was broadcast to ``grad.shape`` in the forward
    pass, each element of ``x`` was used once per broadcast copy, so its
    gradient is the sum over those copies: over the leading axes that
    broadcasting added, and over the axes where ``shape`` has size 1.

    >>> unbroadcast(np.ones((2, 3, 4)), (3, 1)).tolist()
    [[8.0], [8.0], [8.0]]
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    size_one = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if size_one:
        grad = grad.sum(axis=size_one, keepdims=True)
    return grad


def normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    """``axis`` (None, int or tuple, negatives allowed) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim if ndim else 0)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis}")
    return tuple(sorted(out))


def as_int_array(values, op_name: str, what: str):
    """Integer ids (a Tensor, array, list or number) as an integer array; TypeError otherwise.

    Shared by the ops that take ids rather than values (embedding, cross_entropy).
    An empty Python list becomes an empty integer array (NumPy would make it float64).
    """
    data = values.data if isinstance(values, Tensor) else values
    if not hasattr(data, "dtype") or isinstance(data, np.generic):
        data = np.asarray(data)
        if data.size == 0 and data.dtype.kind == "f":
            data = data.astype(np.int64)
    if data.dtype.kind not in "iu":
        raise TypeError(f"{op_name}: {what} must be integers, got dtype {data.dtype}")
    return data
