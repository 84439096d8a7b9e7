"""Rotary position embedding: NumPy formula (Hugging Face's rotate_half form), gradcheck, fused == composed."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import functional as F
from minillm.ops.rope import rope_frequencies

from helpers import as_np, t

RNG = np.random.default_rng(0)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def reference_inv_freq(dim, theta, scaling=None):
    """The frequencies as Hugging Face's Llama writes them, branch by branch."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    result = []
    for w in inv_freq:
        wavelen = 2 * math.pi / w
        if wavelen < old_len / high:
            result.append(w)
        elif wavelen > old_len / low:
            result.append(w / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            result.append((1 - smooth) * w / factor + smooth * w)
    return np.array(result)


def reference_rope(x, positions, theta=10000.0, scaling=None):
    """x·cos + rotate_half(x)·sin with cos, sin = cat(freqs, freqs): the Hugging Face formula."""
    freqs = np.asarray(positions, dtype=np.float64)[..., None] * reference_inv_freq(x.shape[-1], theta, scaling)
    emb = np.concatenate([freqs, freqs], axis=-1)
    half = x.shape[-1] // 2
    rotate_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(emb) + rotate_half * np.sin(emb)


@pytest.mark.parametrize("scaling", [None, LLAMA3])
@pytest.mark.parametrize("shape,positions", [((5, 4), np.arange(5)), ((2, 3, 4, 8), np.arange(7, 11)),
                                             ((2, 1, 3, 6), np.array([[[0, 1, 2]], [[5, 6, 7]]]))])
def test_forward_matches_numpy(shape, positions, scaling, device):
    x = RNG.standard_normal(shape)
    out = F.rope(t(x, device), positions, theta=500.0, scaling=scaling)
    np.testing.assert_allclose(as_np(out), reference_rope(x, positions, 500.0, scaling), rtol=1e-12, atol=1e-12)


def test_llama3_scaling_changes_only_the_low_frequencies():
    plain, scaled = rope_frequencies(64, 10000.0), rope_frequencies(64, 10000.0, LLAMA3)
    np.testing.assert_allclose(scaled, reference_inv_freq(64, 10000.0, LLAMA3), rtol=1e-14)
    wavelength = 2 * math.pi / plain
    assert (scaled[wavelength < 16] == plain[wavelength < 16]).all()            # 64 / high_freq_factor
    np.testing.assert_allclose(scaled[wavelength > 64], plain[wavelength > 64] / 8)
    assert ((wavelength >= 16) & (wavelength <= 64)).any()                      # the smoothed band exists


def test_rotation_keeps_norms_and_scores_depend_on_offset_only(device):
    """|R x| = |x|; ⟨R(m) q, R(n) k⟩ is the same for (m, n) = (3, 7) and (10, 14)."""
    q, k = RNG.standard_normal((1, 16)), RNG.standard_normal((1, 16))
    rq = as_np(F.rope(t(q, device), [3]))
    np.testing.assert_allclose(np.linalg.norm(rq), np.linalg.norm(q), rtol=1e-12)

    def score(m, n):
        return float((as_np(F.rope(t(q, device), [m])) * as_np(F.rope(t(k, device), [n]))).sum())

    assert score(3, 7) == pytest.approx(score(10, 14), rel=1e-10)
    assert score(3, 7) != pytest.approx(score(3, 8), rel=1e-3)


def test_position_offset_equals_the_tail_of_a_longer_pass(device):
    """KV cache: rotating rows 4..6 at positions 4..6 equals rows 4..6 of the full pass."""
    x = RNG.standard_normal((2, 3, 7, 8))
    full = as_np(F.rope(t(x, device), np.arange(7)))
    tail = as_np(F.rope(t(x[..., 4:, :], device), np.arange(4, 7)))
    np.testing.assert_allclose(tail, full[..., 4:, :], rtol=1e-14, atol=1e-14)
    for scaling in (None, LLAMA3):              # a range takes the cached tables: the same numbers
        cached = as_np(F.rope(t(x[..., 4:, :], device), range(4, 7), scaling=scaling))
        np.testing.assert_array_equal(cached, as_np(F.rope(t(x[..., 4:, :], device), [4, 5, 6], scaling=scaling)))


@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_gradcheck(scaling, device):
    x = t(RNG.standard_normal((2, 2, 5, 6)), device)
    assert mm.gradcheck(lambda a: F.rope(a, np.arange(3, 8), theta=50.0, scaling=scaling), x)


def test_backward_is_the_rotation_by_minus_the_angle(device):
    x, g = RNG.standard_normal((3, 4)), RNG.standard_normal((3, 4))
    xt = t(x, device)
    F.rope(xt, [1, 2, 3], theta=10.0).backward(mm.backend.to_device(g, xt.device))
    freqs = np.array([1, 2, 3])[:, None] * reference_inv_freq(4, 10.0)
    angles = np.concatenate([freqs, freqs], axis=-1)
    rotate_half = np.concatenate([-g[:, 2:], g[:, :2]], axis=-1)
    np.testing.assert_allclose(xt.grad if device == "cpu" else as_np(xt.grad),
                               g * np.cos(angles) - rotate_half * np.sin(angles), rtol=1e-12, atol=1e-14)


def test_fused_equals_composed(device):
    x = RNG.standard_normal((2, 3, 5, 8))
    results = []
    for fn in (F.rope, F.rope_composed):
        xt = t(x, device)
        out = fn(xt, np.arange(2, 7), theta=1000.0, scaling=LLAMA3)
        out.backward(mm.backend.to_device(np.sin(np.arange(out.size)).reshape(out.shape), out.device))
        results.append((as_np(out), as_np(xt.grad)))
    for fused, composed in zip(*results):
        np.testing.assert_allclose(fused, composed, rtol=1e-12, atol=1e-14)


def test_float32_stays_float32(device):
    x = RNG.standard_normal((4, 3, 8))
    out = F.rope(mm.Tensor(x.astype(np.float32), device=device), np.arange(3), theta=1e4)
    assert out.dtype == np.float32
    np.testing.assert_allclose(as_np(out), reference_rope(x, np.arange(3), 1e4), rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2).map(tuple), rows=st.integers(1, 5), half=st.integers(1, 4),
       start=st.integers(0, 1000), theta=st.floats(2.0, 1e6), scaled=st.booleans())
def test_random_shapes(lead, rows, half, start, theta, scaled, device):
    scaling = LLAMA3 if scaled else None
    x = RNG.standard_normal(lead + (rows, 2 * half))
    positions = np.arange(start, start + rows)
    xt = t(x, device)
    out = F.rope(xt, positions, theta=theta, scaling=scaling)
    np.testing.assert_allclose(as_np(out), reference_rope(x, positions, theta, scaling), rtol=1e-9, atol=1e-9)
    assert mm.gradcheck(lambda a: F.rope(a, positions, theta=theta, scaling=scaling), xt)


def test_errors():
    with pytest.raises(ValueError, match="D even"):
        F.rope(t(np.ones((3, 5))), np.arange(3))
    with pytest.raises(ValueError, match="do not broadcast"):
        F.rope(t(np.ones((3, 4))), np.arange(4))
    for fn in (F.rope, F.rope_composed):      # positions that would broadcast x's rows to more rows
        with pytest.raises(ValueError, match=r"positions of shape \(5, 1, 3\) do not broadcast"):
            fn(t(np.ones((2, 3, 4))), np.zeros((5, 1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        F.rope(t(np.ones((3, 4))), np.arange(3) * 0.5)
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        F.rope(t(np.ones((3, 4))), np.arange(3), scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="needs low_freq_factor"):
        F.rope(t(np.ones((3, 4))), np.arange(3), scaling={"factor": 2.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8})
    with pytest.raises(TypeError, match="must be a Tensor"):
        F.rope(np.ones((3, 4)), np.arange(3))
