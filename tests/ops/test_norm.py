"""layer_norm and rms_norm: forward against NumPy, backward against gradcheck and the
closed form, fused against composed (also across the CPU row blocks), dtypes, bad
shapes, and the CUDA kernels. The ``cpu_kernels`` tests run twice on the CPU: with
the C++ kernels (tests/kernels/test_cpu_norm.py has theirs) and with the NumPy path."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import minillm as mm
from minillm import functional as F
import minillm.ops.norm as norm_module
from minillm.kernels import cpu

from helpers import as_np, t

SETTINGS = settings(max_examples=25, deadline=None)


@pytest.fixture(params=[True, False], ids=["cpu_kernels", "numpy_path"])
def cpu_kernels(request):
    """The test runs with the compiled CPU kernels on, then off (the NumPy row blocks)."""
    with cpu.use_cpu_kernels(request.param):
        yield request.param


def layer_norm_ref(x, w, b, eps):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w
    return y if b is None else y + b


def rms_norm_ref(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@st.composite
def norm_inputs(draw, max_side=5):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))
    x = rng.standard_normal(shape) * scale + draw(st.sampled_from([0.0, 5.0]))
    w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    return x, w, b


CASES = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), lambda x, w, b: F.layer_norm_composed(x, w, b),
                   lambda x, w, b: layer_norm_ref(x, w, b, 1e-5)),
    "layer_norm_no_bias": (lambda x, w, b: F.layer_norm(x, w), lambda x, w, b: F.layer_norm_composed(x, w),
                           lambda x, w, b: layer_norm_ref(x, w, None, 1e-5)),
    "rms_norm": (lambda x, w, b: F.rms_norm(x, w), lambda x, w, b: F.rms_norm_composed(x, w),
                 lambda x, w, b: rms_norm_ref(x, w, 1e-6)),
}


@pytest.mark.parametrize("case", list(CASES))
@SETTINGS
@given(inputs=norm_inputs())
def test_forward_gradcheck_and_composed(device, cpu_kernels, case, inputs):
    fused, composed, ref = CASES[case]
    x, w, b = inputs
    np.testing.assert_allclose(as_np(fused(t(x, device), t(w, device), t(b, device))), ref(x, w, b),
                               rtol=1e-10, atol=1e-12)
    mm.gradcheck(fused, t(x, device), t(w, device), t(b, device))
    fused_in = [t(a, device) for a in (x, w, b)]
    composed_in = [t(a, device) for a in (x, w, b)]
    ya, yb = fused(*fused_in), composed(*composed_in)
    np.testing.assert_allclose(as_np(ya), as_np(yb), rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(0).standard_normal(x.shape)
    ya.backward(g)
    yb.backward(g)
    for a, c in zip(fused_in, composed_in):
        if c.grad is None:                                   # the unused bias
            assert a.grad is None
            continue
        np.testing.assert_allclose(as_np(a.grad), as_np(c.grad), rtol=1e-9, atol=1e-10)


def test_layer_norm_backward_matches_closed_form(device, cpu_kernels):
    rng = np.random.default_rng(1)
    x, w, b, g = rng.standard_normal((4, 6)), rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal((4, 6))
    xt, wt, bt = t(x, device), t(w, device), t(b, device)
    F.layer_norm(xt, wt, bt, eps=1e-3).backward(g)
    r = 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-3)
    x_hat = (x - x.mean(-1, keepdims=True)) * r
    g_w = g * w
    dx = r * (g_w - g_w.mean(-1, keepdims=True) - x_hat * (g_w * x_hat).mean(-1, keepdims=True))
    np.testing.assert_allclose(as_np(xt.grad), dx, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(as_np(wt.grad), (g * x_hat).sum(0), rtol=1e-12)
    np.testing.assert_allclose(as_np(bt.grad), g.sum(0), rtol=1e-12)


@pytest.mark.parametrize("case", ["layer_norm", "rms_norm"])
def test_many_rows_cross_cpu_blocks(device, case, monkeypatch):
    """The CPU path works on blocks of rows; a tiny block size makes every block boundary
    (and a short last block) show up in a small test."""
    monkeypatch.setattr(norm_module, "_BLOCK_ELEMENTS", 20)
    fused, composed, ref = CASES[case]
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((3, 11, 7)) * 3, rng.standard_normal(7), rng.standard_normal(7)
    fused_in = [t(a, device) for a in (x, w, b)]
    composed_in = [t(a, device) for a in (x, w, b)]
    with cpu.use_cpu_kernels(False):                         # the row blocks are the NumPy path's
        ya = fused(*fused_in)
    yb = composed(*composed_in)
    np.testing.assert_allclose(as_np(ya), ref(x, w, b), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(x.shape)
    ya.backward(g)
    yb.backward(g)
    for a, c in zip(fused_in, composed_in):
        if c.grad is not None:
            np.testing.assert_allclose(as_np(a.grad), as_np(c.grad), rtol=1e-10, atol=1e-11)


def test_size_one_feature_axis(device, cpu_kernels):
    x, w, b = t(np.array([[3.0], [-2.0]]), device), t(np.array([2.0]), device), t(np.array([0.5]), device)
    y = F.layer_norm(x, w, b)
    np.testing.assert_allclose(as_np(y), [[0.5], [0.5]])           # x̂ = 0: only the bias is left
    y.sum().backward()
    np.testing.assert_allclose(as_np(x.grad), 0, atol=1e-12)
    np.testing.assert_allclose(as_np(b.grad), [2.0])


def test_empty_batch(device, cpu_kernels):
    x = t(np.zeros((0, 4)), device)
    w, b = t(np.ones(4), device), t(np.zeros(4), device)
    y = F.layer_norm(x, w, b)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 4)
    np.testing.assert_array_equal(as_np(w.grad), 0)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_stays_float32(device, cpu_kernels, case):
    fused, _, ref = CASES[case]
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((5, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32),
              rng.standard_normal(64).astype(np.float32)]
    inputs = [mm.Tensor(a, requires_grad=True, device=device) for a in arrays]
    y = fused(*inputs)
    assert y.dtype == np.float32
    np.testing.assert_allclose(as_np(y), ref(*(a.astype(np.float64) for a in arrays)), rtol=1e-4, atol=1e-5)
    y.sum().backward()
    assert inputs[0].grad.dtype == np.float32 and inputs[1].grad.dtype == np.float32


def test_bad_weight_shape(device):
    x = t(np.ones((2, 4)), device)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        F.layer_norm(x, t(np.ones(3), device), t(np.ones(4), device))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        F.layer_norm(x, t(np.ones(4), device), t(np.ones((1, 4)), device))
    with pytest.raises(ValueError, match="weight"):
        F.rms_norm(x, t(np.ones(5), device))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_kernels_equal_numpy_path(gpu, dtype):
    rng = np.random.default_rng(4)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    for shape, with_bias in (((3, 700, 768), True), ((5, 3), False), ((1, 2000), True)):
        arrays = [(rng.standard_normal(shape) * 2 + 1).astype(dtype), rng.standard_normal(shape[-1]).astype(dtype),
                  rng.standard_normal(shape[-1]).astype(dtype)]
        g = rng.standard_normal(shape).astype(dtype)
        results = []
        for dev in ("cpu", "cuda"):
            inputs = [mm.Tensor(a, requires_grad=True, device=dev) for a in arrays]
            y = F.layer_norm(*inputs) if with_bias else F.layer_norm(*inputs[:2])
            y.backward(mm.Tensor(g, device=dev))
            results.append([as_np(y)] + [as_np(i.grad) for i in inputs[: 3 if with_bias else 2]])
        for got, expected in zip(results[1], results[0]):
            scale = max(1.0, float(np.abs(expected).max()))
            np.testing.assert_allclose(got / scale, expected / scale, **tol)
