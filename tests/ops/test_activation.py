"""Activations: forward against NumPy / math formulas, backward against gradcheck,
fused against composed, stability for large logits, dtypes, and the CUDA kernels."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import minillm as mm
from minillm import functional as F
from minillm.ops.activation import erf_array, erfc_array

from helpers import arrays, as_np, shapes, t

SETTINGS = settings(max_examples=25, deadline=None)
K = math.sqrt(2 / math.pi)


# ------------------------------------------------------------------ plain NumPy / math references


def gelu_tanh_ref(x):
    return 0.5 * x * (1 + np.tanh(K * (x + 0.044715 * x * x * x)))


def gelu_exact_ref(x):
    """x Φ(x), Φ(x) = ½(1 + erf(x/√2)) = ½ erfc(-x/√2) (the erfc form keeps the left tail accurate)."""
    return np.vectorize(lambda v: 0.5 * v * math.erfc(-v / math.sqrt(2)))(x)


def sigmoid_ref(x):
    return np.vectorize(lambda v: 1 / (1 + math.exp(-v)) if v > -700 else math.exp(v))(x)


def softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_ref(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


ELEMENTWISE = {
    "relu": (F.relu, lambda x: np.maximum(x, 0)),
    "sigmoid": (F.sigmoid, sigmoid_ref),
    "silu": (F.silu, lambda x: x * sigmoid_ref(x)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), gelu_tanh_ref),
    "gelu_exact": (lambda x: F.gelu(x, approximate="none"), gelu_exact_ref),
}


# ------------------------------------------------------------------ erf


def test_erf_matches_math_erf_to_float64_rounding():
    x = np.concatenate([np.linspace(-7, 7, 20001), [0.0, -0.0, 0.46875, -0.46875, 4.0, -4.0, 26.0, 1e-300]])
    expected = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(erf_array(x), expected, rtol=1e-15, atol=0)


def test_erfc_is_accurate_in_the_far_tail():
    x = np.linspace(-5, 27, 30001)
    expected = np.array([math.erfc(v) for v in x])
    np.testing.assert_allclose(erfc_array(x), expected, rtol=2e-15, atol=1e-300)


def test_erf_special_values_and_float32():
    np.testing.assert_array_equal(erf_array(np.array([np.inf, -np.inf, 0.0])), [1.0, -1.0, 0.0])
    assert np.isnan(erf_array(np.array([np.nan]))).all()
    x32 = np.linspace(-6, 6, 4001, dtype=np.float32)
    out = erf_array(x32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [math.erf(v) for v in x32.astype(np.float64)], rtol=0, atol=3e-7)


# ------------------------------------------------------------------ elementwise activations


@pytest.mark.parametrize("name", list(ELEMENTWISE))
@SETTINGS
@given(data=st.data())
def test_elementwise_forward_and_gradcheck(device, name, data):
    fn, ref = ELEMENTWISE[name]
    x = data.draw(arrays(data.draw(shapes), st.floats(-6, 6, width=64)))
    if name == "relu":  # keep away from the kink, where central differences are meaningless
        x = np.where(np.abs(x) < 1e-3, 0.5, x)
    xt = t(x, device)
    np.testing.assert_allclose(as_np(fn(xt)), ref(x), rtol=1e-12, atol=1e-14)
    mm.gradcheck(fn, xt)


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_extreme_values_stay_finite(device, name):
    fn, ref = ELEMENTWISE[name]
    x = np.array([-1e4, -800.0, -40.0, -1.0, 0.0, 1.0, 40.0, 800.0, 1e4])
    out = as_np(fn(t(x, device)))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref(x), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_derivative_matches_closed_form(device, approximate, cpu_path):
    x = np.linspace(-6, 6, 61)
    xt = t(x, device)
    F.gelu(xt, approximate=approximate).sum().backward()
    if approximate == "tanh":
        u = K * (x + 0.044715 * x ** 3)
        expected = 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2) * K * (1 + 3 * 0.044715 * x ** 2)
    else:
        cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
        expected = cdf + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    # (1 - t²) cancels where t ≈ ±1: ~1e-16 absolute, times ½ x k (1 + 3c x²) ~ 10 → atol 1e-14
    np.testing.assert_allclose(as_np(xt.grad), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@SETTINGS
@given(data=st.data())
def test_gelu_fused_equals_composed(device, approximate, data, cpu_path):
    x = data.draw(arrays(data.draw(shapes), st.floats(-8, 8, width=64)))
    a, b = t(x, device), t(x, device)
    ya, yb = F.gelu(a, approximate), F.gelu_composed(b, approximate)
    np.testing.assert_allclose(as_np(ya), as_np(yb), rtol=1e-13, atol=1e-15)
    g = np.random.default_rng(0).standard_normal(x.shape)
    ya.backward(g)
    yb.backward(g)
    np.testing.assert_allclose(as_np(a.grad), as_np(b.grad), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_float32_in_float32_out(device, name):
    fn, ref = ELEMENTWISE[name]
    x = np.random.default_rng(1).standard_normal((3, 17)).astype(np.float32)
    xt = mm.Tensor(x, requires_grad=True, device=device)
    y = fn(xt)
    assert y.dtype == np.float32
    np.testing.assert_allclose(as_np(y), ref(x.astype(np.float64)), rtol=2e-6, atol=2e-6)
    y.sum().backward()
    assert xt.grad.dtype == np.float32


def test_gelu_rejects_unknown_approximation(device):
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(t(np.ones(3), device), approximate="sigmoid")
    with pytest.raises(ValueError, match="approximate"):
        F.gelu_composed(t(np.ones(3), device), approximate="erf")


def test_empty_inputs(device):
    for fn, _ in ELEMENTWISE.values():
        assert fn(t(np.zeros((0, 3)), device)).shape == (0, 3)
    assert F.softmax(t(np.zeros((0, 3)), device)).shape == (0, 3)
    assert F.log_softmax(t(np.zeros((2, 0)), device)).shape == (2, 0)


# ------------------------------------------------------------------ softmax / log_softmax


def shape_and_axis():
    return hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(-len(s), len(s) - 1)))


@pytest.mark.parametrize("log", [False, True])
@SETTINGS
@given(data=st.data())
def test_softmax_forward_gradcheck_and_composed(device, log, data):
    shape, axis = data.draw(shape_and_axis())
    x = data.draw(arrays(shape, st.floats(-10, 10, width=64)))
    fused, composed, ref = ((F.log_softmax, F.log_softmax_composed, log_softmax_ref) if log
                            else (F.softmax, F.softmax_composed, softmax_ref))
    a, b = t(x, device), t(x, device)
    ya, yb = fused(a, axis=axis), composed(b, axis=axis)
    np.testing.assert_allclose(as_np(ya), ref(x, axis), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(as_np(ya), as_np(yb), rtol=1e-12, atol=1e-14)
    g = np.random.default_rng(0).standard_normal(shape)
    ya.backward(g)
    yb.backward(g)
    np.testing.assert_allclose(as_np(a.grad), as_np(b.grad), rtol=1e-10, atol=1e-12)
    mm.gradcheck(lambda z: fused(z, axis=axis), t(x, device))


def test_softmax_backward_matches_jacobian_formula(device):
    x = np.random.default_rng(2).standard_normal((2, 5))
    g = np.random.default_rng(3).standard_normal((2, 5))
    xt = t(x, device)
    F.softmax(xt).backward(g)
    y = softmax_ref(x, -1)
    expected = np.einsum("ni,nij->nj", g, np.einsum("ni,ij->nij", y, np.eye(5)) - y[:, :, None] * y[:, None, :])
    np.testing.assert_allclose(as_np(xt.grad), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_is_stable_for_logits_of_1e4(device, dtype):
    x = np.array([[1e4, 1e4 - 1, -1e4, 0.0], [-1e4, -1e4, -1e4 + 2, -1e4]], dtype=dtype)
    xt = mm.Tensor(x, requires_grad=True, device=device)
    probs, logp = F.softmax(xt), F.log_softmax(xt)
    assert probs.dtype == dtype and logp.dtype == dtype
    expected = softmax_ref(x.astype(np.float64), -1)
    np.testing.assert_allclose(as_np(probs), expected, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(as_np(logp), log_softmax_ref(x.astype(np.float64), -1), rtol=1e-6)
    (probs.sum() + logp.sum()).backward()
    assert np.isfinite(as_np(xt.grad)).all()
    composed = F.softmax_composed(mm.Tensor(x, device=device))
    np.testing.assert_allclose(as_np(composed), expected, rtol=1e-6, atol=1e-30)


def test_softmax_bad_axis(device):
    with pytest.raises(ValueError, match="out of range"):
        F.softmax(t(np.ones((2, 3)), device), axis=2)
    with pytest.raises(TypeError, match="axis"):
        F.log_softmax(t(np.ones((2, 3)), device), axis=(0, 1))


# ------------------------------------------------------------------ the CUDA kernels against the NumPy path


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_kernels_equal_numpy_path(gpu, dtype):
    rng = np.random.default_rng(4)
    # float32: GELU's derivative has (1 - t²) with t ≈ ±1, where one ulp of tanh moves it by ~1e-7
    # and ½ x k (1 + 3c x²) amplifies that ~50-fold for |x| ~ 10: CUDA's and NumPy's tanh differ by an ulp
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)
    cases = [
        (lambda z: F.gelu(z, "tanh"), (1000, 37)),
        (lambda z: F.gelu(z, "none"), (1000, 37)),
        (F.softmax, (33, 1000)),
        (F.log_softmax, (33, 1000)),
        (F.softmax, (7, 3)),
    ]
    for fn, shape in cases:
        x = (rng.standard_normal(shape) * 4).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        results = []
        for dev in ("cpu", "cuda"):
            xt = mm.Tensor(x, requires_grad=True, device=dev)
            y = fn(xt)
            y.backward(mm.Tensor(g, device=dev))
            results.append((as_np(y), as_np(xt.grad)))
        np.testing.assert_allclose(results[1][0], results[0][0], **tol)
        np.testing.assert_allclose(results[1][1], results[0][1], **tol)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_of_a_0d_tensor_fused_and_composed(approximate, cpu_path):
    """0-d inputs: NumPy's x * x is then a scalar, not an array (the erf primitive's backward
    wrote into it with ``out=`` and failed)."""
    for fn in (F.gelu, F.gelu_composed):
        x = mm.Tensor(np.array(0.7), requires_grad=True)
        y = fn(x, approximate)
        assert y.shape == ()
        y.backward()
        mm.gradcheck(lambda z: fn(z, approximate), mm.Tensor(np.array(-0.4), requires_grad=True))
        expected = gelu_tanh_ref(0.7) if approximate == "tanh" else gelu_exact_ref(np.array(0.7))
        np.testing.assert_allclose(as_np(y), expected, rtol=1e-12)
