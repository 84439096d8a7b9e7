"""Shape ops: reshape, transpose/permute, indexing, concat/stack/split, expand, (un)squeeze.

None of these change values, they only move them, so every backward moves
the gradient back: reshape it back, transpose it back, scatter it back into
the positions it was read from.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..backend import array_module
from ..tensor import Function, IndexedGradient, Tensor, inverse_permutation
from .common import unbroadcast


def _shape_arg(shape) -> tuple:
    """Accept reshape(2, 3) as well as reshape((2, 3))."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)


class Reshape(Function):
    """z = x viewed with a new shape.   dz/dx: reshape the gradient back."""

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.source_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise ValueError(f"cannot reshape a tensor of shape {x.shape} ({x.size} elements) into {self.shape}") from None

    def backward(self, grad):
        return (grad.reshape(self.source_shape),)


class Transpose(Function):
    """z = x with its axes permuted.   dz/dx: permute back with the inverse permutation."""

    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        axes = self.axes if self.axes is not None else tuple(reversed(range(x.ndim)))
        if sorted(a % max(x.ndim, 1) for a in axes) != list(range(x.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of a {x.ndim}-d tensor's axes")
        self.axes = tuple(a % x.ndim for a in axes)
        return x.transpose(self.axes)

    def backward(self, grad):
        return (grad.transpose(inverse_permutation(self.axes)),)


def _to_index(index):
    """Tensors inside an index become their arrays (integer or boolean indices)."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


def _is_basic(index) -> bool:
    """Slices, ints, None and Ellipsis only: each element of x is read at most once."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, np.integer, slice, type(None), type(Ellipsis))) for p in parts)


class GetItem(Function):
    """z = x[index].   dz/dx: zeros, with grad added back where x was read.

    Basic indices (slices, ints) read each element once, so a plain assignment
    does: their backward hands the engine an ``IndexedGradient`` (grad and where
    it goes), so that the reads of one array fill one buffer. Integer-array
    indices may read an element several times, so their gradients are
    accumulated with a scatter-add (``np.add.at``).
    """

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.source_shape = x.shape
        self.source_axes = _memory_order(x)
        return x[self.index]

    def backward(self, grad):
        if _is_basic(self.index):   # the engine sums the reads of one array into one buffer
            return (IndexedGradient(self.source_shape, self.index, grad, self.source_axes),)
        grad_x = array_module(grad).zeros(self.source_shape, dtype=grad.dtype)
        scatter_add(grad_x, self.index, grad)
        return (grad_x,)


def _memory_order(x) -> tuple[int, ...] | None:
    """For a transposed view of a contiguous array, its axes in memory order (outermost first);
    None for a contiguous array or any other layout."""
    if x.ndim < 2 or x.flags.c_contiguous or min(x.strides) <= 0:
        return None
    axes = tuple(sorted(range(x.ndim), key=lambda a: -x.strides[a]))
    return axes if x.transpose(axes).flags.c_contiguous else None


def scatter_add(target, index, values) -> None:
    """target[index] += values, accumulating over repeated indices (NumPy and CuPy).

    On the CPU, rows of ``values`` scattered into a table with few rows for their
    number (an embedding of a small vocabulary: 2,048 ids into 65 rows) are summed
    per id after a sort instead (``np.add.reduceat``: 1.2 ms instead of ``np.add.at``'s
    4.8); for many distinct ids (50,257 rows) ``np.add.at`` is the faster.
    """
    xp = array_module(target)
    if (xp is np and getattr(index, "ndim", 0) == 1 and values.ndim == target.ndim >= 2
            and index.size >= 4 * target.shape[0] and index.dtype.kind in "iu"):
        index = np.where(index < 0, index + target.shape[0], index)               # -1 and n - 1: one row
        order = np.argsort(index, kind="stable")
        ids = index[order]
        starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))    # first row of each id
        target[ids[starts]] += np.add.reduceat(values[order], starts, axis=0)
        return
    xp.add.at(target, index, values)


class Concat(Function):
    """z = [x₁, x₂, …] joined along ``axis``.   dz/dxᵢ: the slice of grad that xᵢ became."""

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        xp = array_module(xs[0])
        self.sizes = [x.shape[self.axis] for x in xs]
        try:
            return xp.concatenate(xs, axis=self.axis)
        except ValueError:
            shapes = ", ".join(str(x.shape) for x in xs)
            raise ValueError(f"concat along axis {self.axis}: shapes {shapes} differ off that axis") from None

    def backward(self, grad):
        bounds = np.cumsum(self.sizes)[:-1]
        return tuple(array_module(grad).split(grad, bounds, axis=self.axis))


class Expand(Function):
    """z = x broadcast to a larger shape.   dz/dx = unbroadcast(grad): sum over the copies."""

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.source_shape = x.shape
        shape = tuple(s if t == -1 else t for s, t in zip((1,) * (len(self.shape) - x.ndim) + x.shape, self.shape))
        try:
            return array_module(x).broadcast_to(x, shape)
        except ValueError:
            raise ValueError(f"cannot expand shape {x.shape} to {self.shape}") from None

    def backward(self, grad):
        return (unbroadcast(grad, self.source_shape),)


# ------------------------------------------------------------ public functions


def reshape(x: Tensor, *shape) -> Tensor:
    return Reshape.apply(x, shape=_shape_arg(shape))


def transpose(x: Tensor, *axes) -> Tensor:
    """Reverse the axes (no arguments) or permute them; ``transpose(x, 0, 2, 1)``."""
    axes = _shape_arg(axes) if axes else None
    if axes is not None and len(axes) == 2 and x.ndim > 2:
        # PyTorch-style swap of two axes: x.transpose(1, 2)
        perm = list(range(x.ndim))
        perm[axes[0]], perm[axes[1]] = perm[axes[1]], perm[axes[0]]
        axes = tuple(perm)
    return Transpose.apply(x, axes=axes)


def permute(x: Tensor, *axes) -> Tensor:
    return Transpose.apply(x, axes=_shape_arg(axes))


def getitem(x: Tensor, index) -> Tensor:
    return GetItem.apply(x, index=_to_index(index))


def concat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    if len(tensors) == 0:
        raise ValueError("concat needs at least one tensor")
    return Concat.apply(*tensors, axis=axis)


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join along a new axis: unsqueeze each, then concat (a composition)."""
    if len(tensors) == 0:
        raise ValueError("stack needs at least one tensor")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stack: all tensors must have the same shape, got {sorted(shapes)}")
    return concat([unsqueeze(t, axis) for t in tensors], axis=axis)


def split(x: Tensor, sections, axis: int = 0) -> list[Tensor]:
    """Split into equal ``sections`` (an int) or at the given indices (a list), like NumPy.

    Each piece is a slice of ``x`` (a GetItem), so the gradients of the pieces
    meet again in ``x`` by the engine's accumulation.
    """
    size = x.shape[axis]
    if isinstance(sections, int):
        if sections <= 0 or size % sections:
            raise ValueError(f"split: axis {axis} of size {size} does not divide into {sections} equal parts")
        step = size // sections
        bounds = [(i * step, (i + 1) * step) for i in range(sections)]
    else:
        edges = [0, *sections, size]
        bounds = list(zip(edges[:-1], edges[1:]))
    axis = axis % x.ndim
    lead = (slice(None),) * axis
    return [getitem(x, lead + (slice(start, stop),)) for start, stop in bounds]


def expand(x: Tensor, *shape) -> Tensor:
    return Expand.apply(x, shape=_shape_arg(shape))


def squeeze(x: Tensor, axis=None) -> Tensor:
    """Drop size-1 axes (all of them, or the ones named)."""
    if axis is None:
        shape = tuple(n for n in x.shape if n != 1)
    else:
        axes = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
        for a in axes:
            if x.shape[a] != 1:
                raise ValueError(f"squeeze: axis {a} has size {x.shape[a]}, not 1")
        shape = tuple(n for i, n in enumerate(x.shape) if i not in axes)
    return reshape(x, shape)


def unsqueeze(x: Tensor, axis: int) -> Tensor:
    """Insert a size-1 axis at ``axis`` (negative counts from the end of the new shape)."""
    axis = axis % (x.ndim + 1)
    return reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])
