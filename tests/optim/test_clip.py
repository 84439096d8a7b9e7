"""clip_grad_norm_: global L2 norm over all gradients, scaled in place when above max_norm."""

import math

import numpy as np
import pytest

import minillm as mm
from minillm import backend, optim


def params_with_grads(grads, device, dtype=np.float32):
    params = []
    for g in grads:
        p = mm.Tensor(np.zeros(np.shape(g), dtype), requires_grad=True, device=device)
        p.grad = backend.to_device(np.array(g, dtype=dtype), device) if g is not None else None
        params.append(p)
    return params


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
def test_clips_to_the_global_norm(device, max_norm):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((4, 3)), rng.standard_normal(7), rng.standard_normal((2, 2, 2))]
    expected_norm = math.sqrt(sum(float(np.sum(g.astype(np.float32).astype(np.float64) ** 2)) for g in grads))
    params = params_with_grads(grads, device)
    arrays = [p.grad for p in params]
    total = optim.clip_grad_norm_(params, max_norm)
    assert isinstance(total, float)
    assert total == pytest.approx(expected_norm, rel=1e-6)
    scale = min(1.0, max_norm / (expected_norm + 1e-6))
    for p, g, array in zip(params, grads, arrays):
        assert p.grad is array and p.grad.dtype == np.float32  # in place
        np.testing.assert_allclose(backend.to_numpy(p.grad), g * scale, rtol=1e-5, atol=1e-7)
    new_norm = math.sqrt(sum(float(np.sum(backend.to_numpy(p.grad).astype(np.float64) ** 2)) for p in params))
    assert new_norm == pytest.approx(min(expected_norm, max_norm), rel=1e-5)


def test_ignores_missing_grads_and_accepts_one_tensor():
    params = params_with_grads([np.array([3.0, 4.0]), None], "cpu", np.float64)
    assert optim.clip_grad_norm_(params, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(params[0].grad, [0.6, 0.8], rtol=1e-6)
    single = params_with_grads([np.array([0.0, 2.0])], "cpu", np.float64)[0]
    assert optim.clip_grad_norm_(single, 10.0) == pytest.approx(2.0)
    assert optim.clip_grad_norm_(params_with_grads([None], "cpu"), 1.0) == 0.0


def test_non_finite_norm_is_reported_and_nothing_scaled():
    params = params_with_grads([np.array([np.inf, 1.0]), np.array([2.0])], "cpu")
    assert math.isinf(optim.clip_grad_norm_(params, 1.0))
    assert params[1].grad[0] == 2.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_multi_tensor_kernels_equal_the_array_version(gpu, dtype):
    from minillm.kernels import optim as kernels

    rng = np.random.default_rng(3)
    host = [rng.standard_normal(n).astype(dtype) for n in (0, 1, 65_536, 65_537, 200_003)]
    host.append(rng.standard_normal((300, 7)).astype(dtype))
    arrays = [backend.to_device(a, gpu) for a in host]
    assert kernels.multi_tensor_fusable(arrays)
    expected = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in host)
    assert float(kernels.multi_sum_squares(arrays)) == pytest.approx(expected, rel=1e-5)
    kernels.multi_scale_(arrays, 0.25)
    for a, h in zip(arrays, host):
        np.testing.assert_allclose(backend.to_numpy(a), h * dtype(0.25), rtol=1e-6)
    assert not kernels.multi_tensor_fusable([arrays[-1].T])  # not contiguous: clip takes the array path


@pytest.mark.parametrize("threads", [1, 3])
def test_large_gradients_split_over_threads_clip_by_the_numpy_norm(monkeypatch, threads):
    """Above PARALLEL_MIN_ELEMENTS the CPU sums the squares in one share per thread (cut across
    tensor boundaries); a non-contiguous gradient takes the plain path. Both give NumPy's float64 norm,
    and every gradient is scaled by the one factor max_norm / (norm + 1e-6)."""
    from minillm.ops import common

    monkeypatch.setattr(common, "CPU_THREADS", threads)
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(n).astype(np.float32) for n in (150_001, 7, 130_000)]
    params = params_with_grads(grads, "cpu")
    expected = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert sum(g.size for g in grads) >= common.PARALLEL_MIN_ELEMENTS
    assert optim.clip_grad_norm_(params, 10.0) == pytest.approx(expected, rel=1e-6)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * (10.0 / (expected + 1e-6)), rtol=1e-6)
    strided = params_with_grads([np.zeros((4, 3))], "cpu")[0]
    strided.grad = rng.standard_normal((3, 4)).astype(np.float32).T      # (4, 3), not contiguous
    reference = float(np.linalg.norm(strided.grad.astype(np.float64)))
    assert optim.clip_grad_norm_([strided], 1e9) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_a_norm_at_or_below_max_norm_leaves_every_gradient_bit_for_bit(scale):
    grads = [np.array([3.0, 0.0], np.float32), np.array([[4.0]], np.float32)]       # norm 5
    params = params_with_grads(grads, "cpu")
    assert optim.clip_grad_norm_(params, 5.0 / scale) == 5.0
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(p.grad, g)
