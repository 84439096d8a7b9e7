"""Backend helpers that change how work is scheduled, never what is computed."""

import numpy as np
import pytest

import minillm as mm
from minillm import backend
from minillm.ops import attention


def test_blas_threads_sets_and_restores():
    functions = backend._openblas_thread_functions()
    if functions is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS whose threads can be set")
    get, _ = functions
    before = get()
    with backend.blas_threads(1) as limited:
        assert limited and get() == 1
    assert get() == before


def test_tile_groups_cover_every_score_once():
    n, tq, tk = 10, 150, 150
    covered = np.zeros((n, tq, tk), dtype=int)
    for group in attention._tile_groups(n, tq, tk, True, "cpu"):
        for b0, b1, r0, r1, k_end in group:
            covered[b0:b1, r0:r1, :k_end] += 1
    needed = ~attention.causal_mask(tq, tk)
    assert (covered[:, needed] == 1).all()          # every visible score exactly once
    assert (covered <= 1).all()


def test_tune_cpu_allocator_is_idempotent():
    first = backend.tune_cpu_allocator()
    assert backend.tune_cpu_allocator() == first
    x = mm.Tensor(np.ones(1 << 20, np.float32), requires_grad=True)
    (x * 2.0).sum().backward()
    assert float(x.grad[0]) == 2.0


def test_ids_checked_on_host_skips_only_the_range_checks():
    """Inside ``ids_checked_on_host()`` (a CUDA-graph capture, the pipeline's schedule) the embedding
    and the loss skip their range checks, one GPU sync each; outside, and after it, they check."""
    import minillm.functional as F

    weight, logits = mm.Tensor(np.arange(12, dtype=np.float32).reshape(4, 3)), mm.Tensor(np.zeros((1, 2, 4), np.float32))
    with pytest.raises(IndexError, match="id -1 is out of range"):
        F.embedding(np.array([[0, -1]]), weight)
    with pytest.raises(ValueError, match="target id 4 is out of range"):
        F.cross_entropy(logits, np.array([[0, 4]]))
    with backend.ids_checked_on_host():
        assert backend.ids_checked()
        rows = F.embedding(np.array([[0, -1]]), weight)          # unchecked: NumPy's -1 is the last row
        np.testing.assert_array_equal(rows.data[0, 1], weight.data[-1])
        F.cross_entropy(logits, np.array([[0, 3]]))             # in range: the same loss as checked
        with pytest.raises(TypeError):                           # the host-side dtype check stays
            F.embedding(np.array([[0.5]]), weight)
    assert not backend.ids_checked()
    with pytest.raises(IndexError, match="id -1 is out of range"):
        F.embedding(np.array([[0, -1]]), weight)
