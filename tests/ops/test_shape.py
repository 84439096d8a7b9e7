"""Shape ops: values move, gradients move back."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm

from helpers import arrays, as_np, shapes, t

SETTINGS = settings(max_examples=25, deadline=None)
RNG = np.random.default_rng(0)


def const(array, device):
    """A constant on the test's device (minillm never moves arrays between devices silently)."""
    return mm.Tensor(np.asarray(array, dtype=np.float64), device=device)


def test_reshape_and_view(device):
    a = RNG.standard_normal((2, 3, 4))
    ta = t(a, device)
    np.testing.assert_array_equal(as_np(ta.reshape(4, 6)), a.reshape(4, 6))
    np.testing.assert_array_equal(as_np(ta.reshape((-1, 2))), a.reshape(-1, 2))
    assert mm.gradcheck(lambda x: x.reshape(6, 4) * const(np.arange(24.0).reshape(6, 4), device), ta)
    with pytest.raises(ValueError, match=r"cannot reshape a tensor of shape \(2, 3, 4\)"):
        ta.reshape(5, 5)


@SETTINGS
@given(data=st.data())
def test_permute(data, device):
    shape = data.draw(shapes)
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    a = data.draw(arrays(shape))
    ta = t(a, device)
    np.testing.assert_array_equal(as_np(ta.permute(*perm)), a.transpose(perm))
    weights = const(np.arange(a.size, dtype=float).reshape(a.transpose(perm).shape), device)
    assert mm.gradcheck(lambda x: x.permute(*perm) * weights, ta)


def test_transpose_swaps_two_axes_like_pytorch(device):
    a = RNG.standard_normal((2, 3, 4, 5))
    ta = t(a, device)
    assert ta.transpose(1, 2).shape == (2, 4, 3, 5)
    assert ta.T.shape == (5, 4, 3, 2)
    np.testing.assert_array_equal(as_np(ta.transpose(-1, -2)), a.swapaxes(-1, -2))


@pytest.mark.parametrize("index", [
    (slice(None), 1),
    (slice(1, None, 2), slice(None, None, -1)),
    (Ellipsis, 0),
    (None, 1),
    1,
    ([0, 2, 2, 0],),            # repeated integer index: gradients accumulate
    (np.array([[1, 0], [2, 2]]), slice(0, 3)),
    "mask",
])
def test_getitem(index, device):
    a = RNG.standard_normal((3, 4))
    if isinstance(index, str):
        index = a > 0
    ta = t(a, device)
    xp = mm.backend.module_for(ta.device)
    dev_index = tuple(xp.asarray(i) if isinstance(i, (list, np.ndarray)) else i for i in index) \
        if isinstance(index, tuple) else (xp.asarray(index) if isinstance(index, np.ndarray) else index)
    np.testing.assert_array_equal(as_np(ta[dev_index]), a[index])
    assert mm.gradcheck(lambda x: x[dev_index] * 1.5, ta)


def test_getitem_repeated_index_accumulates():
    x = mm.Tensor(np.zeros(3), requires_grad=True)
    x[np.array([0, 0, 2])].sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 0.0, 1.0])


def test_concat_stack_split(device):
    a, b = RNG.standard_normal((2, 3)), RNG.standard_normal((2, 5))
    ta, tb = t(a, device), t(b, device)
    np.testing.assert_array_equal(as_np(mm.concat([ta, tb], axis=1)), np.concatenate([a, b], 1))
    assert mm.gradcheck(lambda x, y: mm.concat([x, y, x], axis=-1) * 2.0, ta, tb)
    c = t(RNG.standard_normal((2, 3)), device)
    np.testing.assert_array_equal(as_np(mm.stack([ta, c], axis=1)), np.stack([a, c.numpy()], 1))
    assert mm.gradcheck(lambda x, y: mm.stack([x, y], axis=0).sum(axis=0) * x, ta, c)
    pieces = mm.split(tb, [1, 4], axis=1)
    assert [p.shape for p in pieces] == [(2, 1), (2, 3), (2, 1)]
    assert mm.gradcheck(lambda x: mm.concat(mm.split(x, [1, 4], axis=1)[::-1], axis=1) * const(np.arange(10.0).reshape(2, 5), device), tb)
    with pytest.raises(ValueError, match="differ off that axis"):
        mm.concat([ta, tb], axis=0)
    with pytest.raises(ValueError, match="equal parts"):
        mm.split(tb, 2, axis=1)
    with pytest.raises(ValueError, match="same shape"):
        mm.stack([ta, tb])


def test_expand_squeeze_unsqueeze(device):
    a = RNG.standard_normal((3, 1))
    ta = t(a, device)
    np.testing.assert_array_equal(as_np(ta.expand(2, 3, 4)), np.broadcast_to(a, (2, 3, 4)))
    assert mm.gradcheck(lambda x: x.expand(2, 3, 4) * const(np.arange(24.0).reshape(2, 3, 4), device), ta)
    assert ta.squeeze().shape == (3,) and ta.squeeze(1).shape == (3,)
    assert ta.unsqueeze(0).shape == (1, 3, 1) and ta.unsqueeze(-1).shape == (3, 1, 1)
    assert mm.gradcheck(lambda x: x.squeeze(1).unsqueeze(0) * 3.0, ta)
    with pytest.raises(ValueError, match="axis 0 has size 3"):
        ta.squeeze(0)
    with pytest.raises(ValueError, match="cannot expand"):
        ta.expand(2, 2)
