"""Shared Hypothesis strategies and helpers for op tests."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minillm as mm

# small shapes keep element-by-element gradient checks fast
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
finite = st.floats(-3, 3, allow_nan=False, allow_infinity=False, width=64)


def arrays(shape, elements=finite):
    return hnp.arrays(np.float64, shape, elements=elements)


def broadcast_pair():
    """Two shapes that broadcast against each other (size-1 axes and missing leading axes)."""
    return hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1, max_side=4)


def t(array, device="cpu", requires_grad=True):
    return mm.Tensor(np.asarray(array, dtype=np.float64), requires_grad=requires_grad, device=device)


def as_np(x):
    return mm.backend.to_numpy(x.data if isinstance(x, mm.Tensor) else x)
