"""SwiGLU: fused op vs the NumPy formula, gradcheck, fused == composed."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import functional as F

from helpers import as_np, t

RNG = np.random.default_rng(0)


def reference_swiglu(h):
    gate, up = np.split(h, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


@pytest.mark.parametrize("shape", [(6,), (3, 8), (2, 3, 10)])
def test_forward_matches_numpy(shape, device):
    h = RNG.standard_normal(shape) * 3
    np.testing.assert_allclose(as_np(F.swiglu(t(h, device))), reference_swiglu(h), rtol=1e-12, atol=1e-14)


def test_gradcheck(device):
    assert mm.gradcheck(F.swiglu, t(RNG.standard_normal((2, 3, 8)) * 2, device))


def test_fused_equals_composed(device):
    h = RNG.standard_normal((4, 5, 12)) * 4
    results = []
    for fn in (F.swiglu, F.swiglu_composed):
        ht = t(h, device)
        out = fn(ht)
        out.backward(mm.backend.to_device(np.cos(np.arange(out.size)).reshape(out.shape), out.device))
        results.append((as_np(out), as_np(ht.grad)))
    for fused, composed in zip(*results):
        np.testing.assert_allclose(fused, composed, rtol=1e-12, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2).map(tuple), half=st.integers(1, 4),
       scale=st.floats(0.1, 30.0))
def test_random_shapes_and_large_values(lead, half, scale, device):
    h = RNG.standard_normal(lead + (2 * half,)) * scale
    ht = t(h, device)
    np.testing.assert_allclose(as_np(F.swiglu(ht)), reference_swiglu(h), rtol=1e-10, atol=1e-12)
    assert mm.gradcheck(F.swiglu, ht)


def test_odd_width_is_an_error():
    with pytest.raises(ValueError, match="must be even"):
        F.swiglu(t(np.ones((2, 5))))
