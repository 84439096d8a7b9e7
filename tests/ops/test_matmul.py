"""Batched broadcasting matmul and the fused linear op."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import functional as F

from helpers import as_np, t

RNG = np.random.default_rng(0)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_matmul_broadcasts_like_numpy(data, device):
    m, k, n = (data.draw(st.integers(1, 3)) for _ in range(3))
    batch_a = tuple(data.draw(st.lists(st.sampled_from([1, 2]), max_size=2)))
    batch_b = tuple(data.draw(st.lists(st.sampled_from([1, 2]), max_size=2)))
    shape_a = batch_a + (m, k) if data.draw(st.booleans()) or batch_a else (k,)
    shape_b = batch_b + (k, n) if data.draw(st.booleans()) or batch_b else (k,)
    try:
        expected = np.matmul(np.ones(shape_a), np.ones(shape_b))
    except ValueError:
        return
    a, b = RNG.standard_normal(shape_a), RNG.standard_normal(shape_b)
    ta, tb = t(a, device), t(b, device)
    out = ta @ tb
    assert out.shape == expected.shape
    np.testing.assert_allclose(as_np(out), a @ b, rtol=1e-12, atol=1e-12)
    assert mm.gradcheck(lambda x, y: x @ y, ta, tb)


def test_matmul_shape_mismatch_is_clear(device):
    a, b = t(np.ones((2, 3)), device), t(np.ones((4, 5)), device)
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(4, 5\) do not align: 3 .* != 4"):
        a @ b


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(lead, bias, device):
    x = RNG.standard_normal(lead + (4,))
    w = RNG.standard_normal((3, 4))
    b = RNG.standard_normal(3)
    tx, tw, tb = t(x, device), t(w, device), t(b, device)
    out = F.linear(tx, tw, tb if bias else None)
    np.testing.assert_allclose(as_np(out), x @ w.T + (b if bias else 0), rtol=1e-12)
    if bias:
        assert mm.gradcheck(F.linear, tx, tw, tb)
    else:
        assert mm.gradcheck(F.linear, tx, tw)


def test_linear_errors(device):
    x, w = t(np.ones((2, 4)), device), t(np.ones((3, 5)), device)
    with pytest.raises(ValueError, match="input has 4 features"):
        F.linear(x, w)
    with pytest.raises(ValueError, match="bias shape"):
        F.linear(x, t(np.ones((3, 4)), device), t(np.ones(4), device))
