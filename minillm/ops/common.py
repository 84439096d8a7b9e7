"""Helpers shared by every op family."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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


# ------------------------------------------------------------ CPU threads for elementwise passes
#
# NumPy runs each elementwise pass (exp, tanh, +, *) on one core, but releases
# the GIL while it runs. So a chain of passes over a big array goes ~2x faster
# on 2 cores when the rows are shared out between threads, each thread running
# the whole chain on its own rows. (Matrix products need no help: BLAS already
# uses every core.) Only the CPU paths of a few hot ops use this.

CPU_THREADS = max(1, min(os.cpu_count() or 1, 8))
PARALLEL_MIN_ELEMENTS = 1 << 18   # below this, handing work to threads costs more than it saves
_pool: ThreadPoolExecutor | None = None


def row_ranges(n_rows: int, n_cols: int) -> list[slice]:
    """Split ``n_rows`` rows into one contiguous range per CPU thread (a single one when small)."""
    parts = CPU_THREADS if n_rows * n_cols >= PARALLEL_MIN_ELEMENTS else 1
    parts = max(1, min(parts, n_rows))
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    return [slice(b0, b1) for b0, b1 in zip(bounds[:-1], bounds[1:])]


def run_parallel(work, pieces: list) -> list:
    """``[work(piece) for piece in pieces]``, the pieces running on a thread pool when several."""
    global _pool
    if len(pieces) <= 1:
        return [work(piece) for piece in pieces]
    if _pool is None:
        _pool = ThreadPoolExecutor(CPU_THREADS, thread_name_prefix="minillm-cpu")
    return [future.result() for future in [_pool.submit(work, piece) for piece in pieces]]
