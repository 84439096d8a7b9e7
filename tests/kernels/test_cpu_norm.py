"""The C++ CPU kernels of layer norm and RMS norm (minillm/kernels/norm.py): forward, mean/rstd
and every gradient equal to float64 formulas, to the NumPy row-block path (the same op with
``cpu.use_cpu_kernels(False)``) and to the composed ops; float32 and float64, with and without
bias, odd widths, empty and single rows, 3-D inputs, rows shared out between threads;
gradcheck through the kernels; the op's choice of path, made in the forward."""

from __future__ import annotations

import numpy as np
import pytest

import minillm as mm
from minillm import functional as F
from minillm.kernels import cpu, norm as kernels
from minillm.ops import common

pytestmark = pytest.mark.skipif(not cpu.enabled() or kernels._cpu_entries("f64") is None,
                                reason="no C++ compiler, or MINILLM_CPU_KERNELS=0: the CPU kernels are off")

# (shape, with bias); (700, 385) is 269,500 elements: over PARALLEL_MIN_ELEMENTS, so two threads
# each sum dw and db over their own rows
SHAPES = [((6, 1), True), ((4, 3), False), ((7, 385), True), ((0, 8), True), ((2, 3, 5), False),
          ((1, 16), True), ((3, 1, 9), True), ((700, 385), True), ((700, 385), False)]
TOLERANCE = {np.float32: dict(rtol=2e-4, scale_atol=2e-5), np.float64: dict(rtol=1e-11, scale_atol=1e-12)}


def assert_close(got, expected, rtol, scale_atol, what="", scale=0.0):
    """|got - expected| <= rtol |expected| + scale_atol · max(max|expected|, scale)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, what
    atol = scale_atol * max(float(np.abs(expected).max(initial=0.0)), scale, 1e-30)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=what)


def inputs(shape, dtype, seed=0):
    """x with rows of different offsets and spreads (so μ and r matter), w, b, g."""
    rng = np.random.default_rng(seed)
    n = shape[-1]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3, shape[:-1] + (1,)) + rng.uniform(-4, 4, shape[:-1] + (1,))
    return [a.astype(dtype) for a in (x, rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(shape))]


def dx_scale(x, w, g, eps, centred=True):
    """max |r g w|: the size of the terms dx is the difference of (r (g w - mean(g w) - ...)), so
    the size of its rounding errors, also where they cancel (rows of one element: dx = 0)."""
    x = np.asarray(x, dtype=np.float64)
    d = x - x.mean(-1, keepdims=True) if centred else x
    return float(np.abs(g * w / np.sqrt((d * d).mean(-1, keepdims=True) + eps)).max(initial=0.0))


def layer_norm_reference(x, w, b, g, eps):
    """(y, dx, dw, db) in float64 from the definition: x̂ = (x - μ)/√(σ² + eps), y = x̂ w + b."""
    x, w, g = (np.asarray(a, dtype=np.float64) for a in (x, w, g))
    mu = x.mean(-1, keepdims=True)
    r = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    x_hat = (x - mu) * r
    g_w = g * w
    dx = r * (g_w - g_w.mean(-1, keepdims=True) - x_hat * (g_w * x_hat).mean(-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    y = x_hat * w + (0 if b is None else np.asarray(b, dtype=np.float64))
    return y, dx, (g * x_hat).sum(lead), g.sum(lead)


def rms_norm_reference(x, w, g, eps):
    """(y, dx, dw) in float64: x̂ = x/√(mean(x²) + eps), y = x̂ w."""
    x, w, g = (np.asarray(a, dtype=np.float64) for a in (x, w, g))
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    x_hat = x * r
    g_w = g * w
    dx = r * (g_w - x_hat * (g_w * x_hat).mean(-1, keepdims=True))
    return x_hat * w, dx, (g * x_hat).sum(tuple(range(x.ndim - 1)))


def run(op, arrays, g, kernels_on):
    """The op on tensors made from ``arrays`` with the CPU kernels on or off: (y, grads, fused)."""
    tensors = [mm.Tensor(a, requires_grad=True) for a in arrays]
    with cpu.use_cpu_kernels(kernels_on):
        y = op(*tensors)
        fused = getattr(y._ctx, "fused", None)         # (None: a composed op)
        y.backward(g)
    return y.data, [t.grad for t in tensors], fused


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,with_bias", SHAPES)
def test_layer_norm_kernel_equals_reference_numpy_path_and_composed(shape, with_bias, dtype):
    x, w, b, g = inputs(shape, dtype)
    arrays = [x, w, b] if with_bias else [x, w]
    y, grads, fused = run(lambda *a: F.layer_norm(*a, eps=1e-5), arrays, g, True)
    assert fused and y.dtype == dtype and all(d.dtype == dtype for d in grads)
    tol = TOLERANCE[dtype]
    expected = layer_norm_reference(x, w, b if with_bias else None, g, 1e-5)
    scales = (0.0, dx_scale(x, w, g, 1e-5), 0.0, 0.0)
    for got, want, what, scale in zip([y] + grads, expected, ("y", "dx", "dw", "db"), scales):
        assert_close(got, want, **tol, what=f"{what} against float64", scale=scale)
    y_np, grads_np, fused_np = run(lambda *a: F.layer_norm(*a, eps=1e-5), arrays, g, False)
    y_c, grads_c, _ = run(lambda *a: F.layer_norm_composed(*a, eps=1e-5), arrays, g, True)
    assert not fused_np
    for other, name in (([y_np] + grads_np, "NumPy path"), ([y_c] + grads_c, "composed")):
        for got, want, what, scale in zip([y] + grads, other, ("y", "dx", "dw", "db"), scales):
            assert_close(got, want, **tol, what=f"{what} against the {name}", scale=scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [s for s, _ in SHAPES[:8]])
def test_rms_norm_kernel_equals_reference_numpy_path_and_composed(shape, dtype):
    x, w, _, g = inputs(shape, dtype, seed=1)
    y, grads, fused = run(lambda *a: F.rms_norm(*a, eps=1e-6), [x, w], g, True)
    assert fused and y.dtype == dtype
    tol = TOLERANCE[dtype]
    scales = (0.0, dx_scale(x, w, g, 1e-6, centred=False), 0.0)
    for got, want, what, scale in zip([y] + grads, rms_norm_reference(x, w, g, 1e-6), ("y", "dx", "dw"), scales):
        assert_close(got, want, **tol, what=f"{what} against float64", scale=scale)
    y_np, grads_np, fused_np = run(lambda *a: F.rms_norm(*a, eps=1e-6), [x, w], g, False)
    y_c, grads_c, _ = run(lambda *a: F.rms_norm_composed(*a, eps=1e-6), [x, w], g, True)
    assert not fused_np
    for other, name in (([y_np] + grads_np, "NumPy path"), ([y_c] + grads_c, "composed")):
        for got, want, what, scale in zip([y] + grads, other, ("y", "dx", "dw"), scales):
            assert_close(got, want, **tol, what=f"{what} against the {name}", scale=scale)


def test_the_large_shape_is_shared_out_between_threads():
    """(700, 385) above is split into one range of rows per CPU thread (2 here, 8 on a GPU node)."""
    assert len(common.row_ranges(700, 385)) == common.CPU_THREADS


def test_statistics_saved_by_the_forward():
    x, w, b, _ = inputs((5, 7, 33), np.float64, seed=2)
    with cpu.use_cpu_kernels(True):
        y, mean, rstd = kernels.layer_norm_forward(x, w, b, 1e-3)
        y_rms, rstd_rms = kernels.rms_norm_forward(x, w, 1e-3)
    assert mean.shape == rstd.shape == rstd_rms.shape == (5, 7, 1)
    np.testing.assert_allclose(mean, x.mean(-1, keepdims=True), rtol=1e-13)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-3), rtol=1e-13)
    np.testing.assert_allclose(rstd_rms, 1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-3), rtol=1e-13)
    np.testing.assert_allclose(y, layer_norm_reference(x, w, b, x, 1e-3)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_through_the_kernels(with_bias):
    x, w, b, _ = inputs((3, 4, 7), np.float64, seed=3)
    arrays = [x, w, b] if with_bias else [x, w]
    with cpu.use_cpu_kernels(True):
        tensors = [mm.Tensor(a, requires_grad=True) for a in arrays]
        assert F.layer_norm(*tensors)._ctx.fused and F.rms_norm(*tensors[:2])._ctx.fused
        mm.gradcheck(lambda *a: F.layer_norm(*a, eps=1e-5), *tensors)
        mm.gradcheck(lambda *a: F.rms_norm(*a, eps=1e-6), *tensors[:2])


def test_what_the_kernels_do_not_take_runs_the_numpy_path():
    """Non-contiguous x, float16, kernels off: the NumPy path, with the same results."""
    x, w, b, g = inputs((6, 10), np.float64, seed=4)
    cases = [(np.asfortranarray(x), w, b, True), (x, w, b, False),
             (x.astype(np.float16), w.astype(np.float16), b.astype(np.float16), True)]
    for xi, wi, bi, on in cases:
        y, grads, fused = run(F.layer_norm, [xi, wi, bi], g.astype(xi.dtype), on)
        assert not fused
        tol = TOLERANCE[np.float64] if xi.dtype == np.float64 else dict(rtol=2e-2, scale_atol=2e-2)
        for got, want in zip([y] + grads, layer_norm_reference(xi, wi, bi, g, 1e-5)):
            assert_close(got, want, **tol)


def test_a_non_contiguous_gradient_follows_the_kernel_path():
    """The forward chose the kernel; the incoming gradient is a transposed view (y read through
    ``transpose``): the backward still runs the kernel, on a contiguous copy."""
    x, w, b, g = inputs((4, 5, 6), np.float32, seed=5)
    tensors = [mm.Tensor(a, requires_grad=True) for a in (x, w, b)]
    with cpu.use_cpu_kernels(True):
        y = F.layer_norm(*tensors)
        assert y._ctx.fused
        y.transpose(2, 1, 0).backward(g.transpose(2, 1, 0))
    expected = layer_norm_reference(x, w, b, g, 1e-5)
    for got, want in zip([y.data] + [t.grad for t in tensors], expected):
        assert_close(got, want, **TOLERANCE[np.float32])


def test_kernels_switched_off_between_forward_and_backward():
    """The backward follows the forward's choice, whatever is in force when it runs."""
    x, w, b, g = inputs((3, 8), np.float64, seed=6)
    for forward_on in (True, False):
        tensors = [mm.Tensor(a, requires_grad=True) for a in (x, w, b)]
        with cpu.use_cpu_kernels(forward_on):
            y = F.layer_norm(*tensors)
        assert y._ctx.fused == forward_on
        with cpu.use_cpu_kernels(not forward_on):
            y.backward(g)
        for got, want in zip([t.grad for t in tensors], layer_norm_reference(x, w, b, g, 1e-5)[1:]):
            assert_close(got, want, **TOLERANCE[np.float64])


def test_a_kernel_that_could_not_be_built_leaves_the_numpy_path(monkeypatch):
    """``cpu.library`` answers None after a failed compilation: the ops run their NumPy passes."""
    monkeypatch.setattr(kernels, "_cpu_entries", lambda suffix: None)
    x, w, b, g = inputs((3, 8), np.float64, seed=7)
    for op, arrays in ((F.layer_norm, [x, w, b]), (F.rms_norm, [x, w])):
        y, grads, fused = run(op, arrays, g, True)
        assert fused is False
    assert not kernels.layer_norm_fusable(x, w, b) and not kernels.rms_norm_fusable(x, w)
