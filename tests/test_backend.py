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
