"""Reductions against NumPy, over every axis pattern."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm

from helpers import arrays, as_np, shapes, t

SETTINGS = settings(max_examples=30, deadline=None)


def axis_patterns(ndim):
    single = st.integers(-ndim, ndim - 1)
    several = st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).map(tuple)
    return st.none() | single | several


@pytest.mark.parametrize("name", ["sum", "mean", "max", "var"])
@SETTINGS
@given(data=st.data())
def test_reductions(name, data, device):
    shape = data.draw(shapes)
    a = data.draw(arrays(shape))
    if name == "max":  # distinct values: the max is then differentiable
        a = a + np.arange(a.size).reshape(shape) * 1e-3
    axis = data.draw(axis_patterns(len(shape)))
    keepdims = data.draw(st.booleans())
    ta = t(a, device)
    out = getattr(ta, name)(axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(as_np(out), getattr(np, name)(a, axis=axis, keepdims=keepdims), rtol=1e-10, atol=1e-12)
    assert mm.gradcheck(lambda x: getattr(x, name)(axis=axis, keepdims=keepdims), ta)


def test_max_splits_gradient_between_ties():
    x = mm.Tensor(np.array([[1.0, 3.0, 3.0], [0.0, -1.0, 2.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5], [0, 0, 1]])


def test_bad_axis_is_a_clear_error():
    x = mm.Tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        x.sum(axis=2)
    scalar = mm.Tensor(np.array(3.0), requires_grad=True)       # a 0-d tensor has no axis 0 (NumPy's rule)
    for name in ("sum", "mean", "max", "var"):
        with pytest.raises(ValueError, match="axis 0 is out of range for a tensor with 0 dimensions"):
            getattr(scalar, name)(axis=0)
        out = getattr(scalar, name)(axis=())                    # reducing no axis: the tensor itself
        np.testing.assert_allclose(as_np(out), 0.0 if name == "var" else 3.0)


def test_sum_of_empty_batch(device):
    x = t(np.ones((0, 3)), device)
    y = x.sum(axis=0)
    np.testing.assert_array_equal(as_np(y), np.zeros(3))
    y.sum().backward()
    assert x.grad.shape == (0, 3)
