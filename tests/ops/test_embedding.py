"""Embedding (gather forward, scatter-add backward) and inverted dropout."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import minillm as mm
from minillm import functional as F

from helpers import as_np, t

RNG = np.random.default_rng(0)


def reference_embedding_grad(ids, grad, vocab_size):
    """dL/dweight by an explicit loop: every position adds its gradient row to its id's row."""
    out = np.zeros((vocab_size, grad.shape[-1]))
    for position in np.ndindex(*ids.shape):
        out[ids[position]] += grad[position]
    return out


# ------------------------------------------------------------------ embedding


@pytest.mark.parametrize("ids_shape", [(), (5,), (2, 3), (2, 2, 3)])
def test_embedding_forward_and_backward(ids_shape, device):
    vocab, dim = 6, 4
    weight = RNG.standard_normal((vocab, dim))
    ids = RNG.integers(0, vocab, ids_shape)
    tw = t(weight, device)
    out = F.embedding(ids, tw)
    assert out.shape == ids_shape + (dim,)
    np.testing.assert_array_equal(as_np(out), weight[ids])
    grad = RNG.standard_normal(out.shape)
    out.backward(mm.backend.to_device(grad, device))
    np.testing.assert_allclose(as_np(tw.grad), reference_embedding_grad(ids, grad, vocab), rtol=1e-12)


def test_embedding_repeated_ids_accumulate(device):
    tw = t(np.ones((4, 2)), device)
    F.embedding(np.array([1, 1, 1, 3]), tw).sum().backward()
    np.testing.assert_array_equal(as_np(tw.grad), [[0, 0], [3, 3], [0, 0], [1, 1]])


def test_embedding_gradcheck(device):
    tw = t(RNG.standard_normal((5, 3)), device)
    ids = np.array([[0, 4, 4], [2, 0, 1]])
    assert mm.gradcheck(lambda w: F.embedding(ids, w), tw)


@pytest.mark.parametrize("make_ids", [list, np.asarray, lambda a: mm.Tensor(np.asarray(a))],
                         ids=["list", "ndarray", "tensor"])
def test_embedding_accepts_lists_arrays_and_int_tensors(make_ids, device):
    weight = RNG.standard_normal((7, 3))
    ids = [[6, 0], [3, 3]]
    if make_ids is not list and device != "cpu":
        ids_in = mm.Tensor(np.asarray(ids), device=device)      # ids already on the GPU
    else:
        ids_in = make_ids(ids)
    out = F.embedding(ids_in, t(weight, device))
    np.testing.assert_array_equal(as_np(out), weight[np.asarray(ids)])


def test_embedding_float32_and_uint_ids(device):
    weight = RNG.standard_normal((5, 3)).astype(np.float32)
    out = F.embedding(np.array([4, 0], dtype=np.uint16), mm.Tensor(weight, device=device))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(as_np(out), weight[[4, 0]])


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_embedding_random_shapes(data, device):
    vocab = data.draw(st.integers(1, 6))
    dim = data.draw(st.integers(1, 4))
    ids = data.draw(hnp.arrays(np.int64, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
                               elements=st.integers(0, vocab - 1)))
    weight = RNG.standard_normal((vocab, dim))
    tw = t(weight, device)
    out = F.embedding(ids, tw)
    np.testing.assert_array_equal(as_np(out), weight[ids])
    grad = RNG.standard_normal(out.shape)
    out.backward(mm.backend.to_device(grad, device))
    np.testing.assert_allclose(as_np(tw.grad), reference_embedding_grad(ids, grad, vocab), rtol=1e-12, atol=1e-15)


def test_embedding_errors(device):
    tw = t(np.ones((10, 3)), device)
    with pytest.raises(IndexError, match=r"id 10 is out of range for a vocabulary of 10"):
        F.embedding(np.array([1, 10, 2]), tw)
    with pytest.raises(IndexError, match=r"id -1 is out of range for a vocabulary of 10"):
        F.embedding(np.array([[0, -1]]), tw)                # no silent wrap-around
    with pytest.raises(IndexError, match="id 12"):
        F.embedding(mm.Tensor(np.array([12]), device=device), tw)
    with pytest.raises(TypeError, match="ids must be integers, got dtype float"):
        F.embedding(np.array([1.0, 2.0]), tw)
    with pytest.raises(TypeError, match="ids must be integers, got dtype bool"):
        F.embedding(np.array([True]), tw)
    with pytest.raises(ValueError, match="2-D"):
        F.embedding(np.array([0]), t(np.ones(3), device))


def test_embedding_empty_ids(device):
    out = F.embedding([], t(np.ones((3, 2)), device))
    assert out.shape == (0, 2)


# ------------------------------------------------------------------ dropout


def expected_keep(seed, shape, p, device):
    """The mask dropout must use after mm.manual_seed(seed): uniform float32 draws on the device >= p."""
    mm.manual_seed(seed)
    draws = mm.backend.random_uniform(shape, device=mm.backend.parse_device(device), dtype=np.float32)
    return mm.backend.to_numpy(draws) >= p


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_forward_backward_against_the_seeded_mask(p, device):
    x = RNG.standard_normal((3, 4, 5))
    keep = expected_keep(5, x.shape, p, device)
    tx = t(x, device)
    mm.manual_seed(5)
    out = F.dropout(tx, p)
    np.testing.assert_allclose(as_np(out), x * keep / (1 - p), rtol=1e-12)
    grad = RNG.standard_normal(x.shape)
    out.backward(mm.backend.to_device(grad, device))
    np.testing.assert_allclose(as_np(tx.grad), grad * keep / (1 - p), rtol=1e-12)


def test_dropout_gradcheck(device):
    tx = t(RNG.standard_normal((4, 6)), device)

    def drop(x):
        mm.manual_seed(1)
        return F.dropout(x, 0.3)

    assert mm.gradcheck(drop, tx)


def test_dropout_is_reproducible_and_unbiased(device):
    x = mm.Tensor(np.ones(200_000, dtype=np.float32), device=device)
    mm.manual_seed(0)
    a = as_np(F.dropout(x, 0.3))
    mm.manual_seed(0)
    b = as_np(F.dropout(x, 0.3))
    c = as_np(F.dropout(x, 0.3))                            # the stream moved on: a new mask
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert a.dtype == np.float32
    assert abs((a == 0).mean() - 0.3) < 0.01                # ~p of the elements dropped
    assert abs(a.mean() - 1.0) < 0.01                       # E[out] = x
    np.testing.assert_allclose(a[a != 0], 1 / 0.7, rtol=1e-6)


def test_dropout_identity_cases(device):
    x = t(RNG.standard_normal((3, 3)), device)
    assert F.dropout(x, 0.0) is x
    assert F.dropout(x, 0.5, training=False) is x


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_dropout_rejects_bad_p(p, device):
    x = t(np.ones(3), device)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        F.dropout(x, p)


@settings(max_examples=20, deadline=None)
@given(shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5), p=st.floats(0.05, 0.95))
def test_dropout_random_shapes(shape, p, device):
    x = RNG.standard_normal(shape)
    keep = expected_keep(2, shape, p, device)
    mm.manual_seed(2)
    out = F.dropout(t(x, device), p)
    np.testing.assert_allclose(as_np(out), x * keep / (1 - p), rtol=1e-12)
