"""Reads of one array by basic indices: their gradients meet in one buffer (IndexedGradient)."""

import numpy as np

import minillm as mm
from minillm.tensor import IndexedGradient


def test_several_reads_of_one_array_sum_their_gradients():
    rng = np.random.default_rng(0)
    x = mm.Tensor(rng.standard_normal((3, 4, 5)), requires_grad=True)
    h = x * 1.0                                    # not a leaf: the reads' gradients meet at a node
    reads = [h[0], h[1], h[2], h[:, 1], h[1:, :, 2:4]]   # the last two overlap the first three
    weights = [rng.standard_normal(r.shape) for r in reads]
    loss = reads[0].sum() * 0.0
    for r, w in zip(reads, weights):
        loss = loss + (r * w).sum()
    loss.backward()
    expected = np.zeros((3, 4, 5))
    expected[0] += weights[0]
    expected[1] += weights[1]
    expected[2] += weights[2]
    expected[:, 1] += weights[3]
    expected[1:, :, 2:4] += weights[4]
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12, atol=1e-12)


def test_reads_mixed_with_a_dense_gradient_and_on_a_leaf():
    rng = np.random.default_rng(1)
    x = mm.Tensor(rng.standard_normal((4, 6)), requires_grad=True)
    w0, w1 = rng.standard_normal(6), rng.standard_normal((4, 2))
    loss = (x[0] * w0).sum() + (x * x).sum() + (x[:, 2:4] * w1).sum()   # reads of a leaf, and a dense use
    loss.backward()
    expected = 2 * x.data
    expected[0] += w0
    expected[:, 2:4] += w1
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12, atol=1e-12)


def test_dense_keeps_the_first_part_and_adds_the_others():
    g = IndexedGradient((2, 3), 0, np.ones(3))
    g.parts.append((np.s_[:, 1], np.full(2, 5.0)))
    np.testing.assert_array_equal(g.dense(), [[1, 6, 1], [0, 5, 0]])


def test_reads_of_a_transposed_view_get_a_gradient_laid_out_like_it():
    """qkv (B, T, 3, H, D) -> transpose -> q, k, v: the summed gradient is contiguous once transposed
    back, so the reshape before it needs no copy; the values are those of the plain formula."""
    rng = np.random.default_rng(2)
    x = mm.Tensor(rng.standard_normal((2, 5, 12)), requires_grad=True)
    qkv = (x * 1.0).reshape(2, 5, 3, 2, 2).transpose(2, 0, 3, 1, 4)    # (3, B, H, T, D), a view
    ws = [rng.standard_normal((2, 2, 5, 2)) for _ in range(3)]
    loss = (qkv[0] * ws[0]).sum() + (qkv[1] * ws[1]).sum() + (qkv[2] * ws[2]).sum()
    seen = {}
    original = mm.tensor.IndexedGradient.dense

    def spy(self):
        out = original(self)
        seen["contiguous after transpose"] = out.transpose(1, 3, 0, 2, 4).flags.c_contiguous
        return out

    mm.tensor.IndexedGradient.dense = spy
    try:
        loss.backward()
    finally:
        mm.tensor.IndexedGradient.dense = original
    assert seen == {"contiguous after transpose": True}
    expected = np.stack(ws).transpose(1, 3, 0, 2, 4).reshape(2, 5, 12)
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12, atol=1e-12)
