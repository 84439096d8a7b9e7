"""Elementwise ops: forward against NumPy, backward against central differences."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import functional as F

from helpers import arrays, as_np, broadcast_pair, finite, t

SETTINGS = settings(max_examples=25, deadline=None)

BINARY = {
    "add": (F.add, np.add),
    "sub": (F.sub, np.subtract),
    "mul": (F.mul, np.multiply),
    "div": (F.div, np.divide),
    "maximum": (F.maximum, np.maximum),
    "minimum": (F.minimum, np.minimum),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@SETTINGS
@given(data=st.data())
def test_binary_ops_broadcast(name, data, device):
    op, reference = BINARY[name]
    shapes = data.draw(broadcast_pair()).input_shapes
    a = data.draw(arrays(shapes[0]))
    b = data.draw(arrays(shapes[1]))
    if name == "div":
        b = np.where(np.abs(b) < 0.5, 1.0 + np.abs(b), b)
    if name in ("maximum", "minimum"):
        b = b + 0.25 * (np.abs(a - b).min(initial=1) < 1e-3)  # keep away from ties (kinks)
    ta, tb = t(a, device), t(b, device)
    np.testing.assert_allclose(as_np(op(ta, tb)), reference(a, b), rtol=1e-12)
    assert mm.gradcheck(op, ta, tb)


UNARY = {
    "exp": (F.exp, np.exp, finite),
    "log": (F.log, np.log, st.floats(0.2, 5, width=64)),
    "tanh": (F.tanh, np.tanh, finite),
    "sqrt": (F.sqrt, np.sqrt, st.floats(0.2, 5, width=64)),
    "abs": (F.abs, np.abs, st.floats(0.1, 3, width=64) | st.floats(-3, -0.1, width=64)),
    "neg": (F.neg, np.negative, finite),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@SETTINGS
@given(data=st.data())
def test_unary_ops(name, data, device):
    op, reference, elements = UNARY[name]
    from helpers import shapes
    a = data.draw(arrays(data.draw(shapes), elements))
    ta = t(a, device)
    np.testing.assert_allclose(as_np(op(ta)), reference(a), rtol=1e-12)
    assert mm.gradcheck(op, ta)


@pytest.mark.parametrize("exponent", [2, 3, 0.5, -1, 1.7, 1])
def test_pow_constant_exponent(exponent, device):
    a = np.random.default_rng(0).uniform(0.5, 2.0, (3, 4))
    ta = t(a, device)
    np.testing.assert_allclose(as_np(ta ** exponent), a ** exponent, rtol=1e-12)
    assert mm.gradcheck(lambda x: x ** exponent, ta)


def test_pow_tensor_exponent(device):
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 2.0, (3, 1)), rng.uniform(-1, 2, (4,))
    ta, tb = t(a, device), t(b, device)
    np.testing.assert_allclose(as_np(ta ** tb), a ** b, rtol=1e-12)
    assert mm.gradcheck(lambda x, y: x ** y, ta, tb)
    assert mm.gradcheck(lambda y: 2.0 ** y, tb)


def test_scalar_on_the_left(device):
    a = t(np.array([1.0, 2.0, 4.0]), device)
    np.testing.assert_allclose(as_np(1.0 / a), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(as_np(3.0 - a), [2.0, 1.0, -1.0])
    assert mm.gradcheck(lambda x: 1.0 / x - 2.0 * x, a)


@SETTINGS
@given(data=st.data())
def test_where(data, device):
    shapes = data.draw(broadcast_pair()).input_shapes
    a, b = data.draw(arrays(shapes[0])), data.draw(arrays(shapes[1]))
    cond = np.broadcast_to(a, np.broadcast_shapes(a.shape, b.shape)) > 0
    ta, tb = t(a, device), t(b, device)
    np.testing.assert_allclose(as_np(mm.where(cond, ta, tb)), np.where(cond, a, b))
    assert mm.gradcheck(lambda x, y: mm.where(cond, x, y), ta, tb)


def test_clip(device):
    a = np.array([-2.0, -0.5, 0.3, 1.4, 3.0])
    ta = t(a, device)
    np.testing.assert_allclose(as_np(ta.clip(-1.0, 1.0)), np.clip(a, -1, 1))
    assert mm.gradcheck(lambda x: x.clip(min=-1.0, max=1.0), ta)
    assert mm.gradcheck(lambda x: F.clip(x, max=0.0), ta)
    with pytest.raises(ValueError):
        F.clip(ta)


def test_maximum_tie_splits_gradient():
    a = mm.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    b = mm.Tensor(np.array([1.0, 0.0]), requires_grad=True)
    F.maximum(a, b).sum().backward()
    np.testing.assert_allclose(a.grad, [0.5, 1.0])
    np.testing.assert_allclose(b.grad, [0.5, 0.0])


def test_float32_stays_float32():
    x = mm.Tensor(np.ones(4, np.float32), requires_grad=True)
    y = (x * 2.0 + 1.0) / 3.0 - x ** 3 + x.exp().log().tanh().sqrt()
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32
