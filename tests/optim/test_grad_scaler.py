"""GradScaler: fp16 gradients underflow without it and not with it; the scale's state machine."""

import numpy as np
import pytest

import minillm as mm
from minillm import optim


def _fp16_gradient(scaler):
    """A float32 master weight, used in float16 (cast on use, as autocast does), with a loss so
    small that its gradient (1e-9 per element) is below fp16's smallest subnormal (6e-8)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, size=(4, 8)).astype(np.float16)
    w = mm.Tensor(rng.standard_normal((8, 3)).astype(np.float32), requires_grad=True)
    opt = optim.SGD([w], lr=0.0)
    # the loss in float32, the product in float16: the seed 1e-9 (times S) reaches the product in fp16
    loss = (mm.Tensor(x) @ w.to(dtype=np.float16)).sum().to(dtype=np.float32) * 1e-9   # dloss/dw[i, j] = 1e-9 Σ_n x[n, i]
    scaler.scale(loss).backward()
    scaler.unscale_(opt)                                               # no-op when disabled
    expected = 1e-9 * np.repeat(x.astype(np.float64).sum(axis=0)[:, None], 3, axis=1)
    return w.grad, expected


def test_fp16_gradients_underflow_without_the_scaler_and_not_with_it():
    grad, expected = _fp16_gradient(optim.GradScaler(enabled=False))
    assert np.all(grad == 0)                                # 1e-9 flushes to zero in fp16
    grad, expected = _fp16_gradient(optim.GradScaler())     # S = 2^16: 6.6e-5 per element, representable
    assert grad.dtype == np.float32
    # fp16 keeps 11 significant bits: relative error <= 2^-11 per rounding, a few roundings deep
    np.testing.assert_allclose(grad, expected, rtol=4e-3)


def _one_step(scaler, w, opt, grad_value):
    w.grad = np.full(w.shape, grad_value * scaler.get_scale(), dtype=np.float32)   # as backward of S·loss gives
    stepped = scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return stepped


def test_inf_or_nan_skips_the_step_and_halves_the_scale():
    w = mm.Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    opt = optim.SGD([w], lr=0.1)
    scaler = optim.GradScaler()
    assert scaler.get_scale() == 2.0 ** 16
    for bad in (np.inf, np.nan):
        before = w.data.copy()
        assert not _one_step(scaler, w, opt, bad)
        np.testing.assert_array_equal(w.data, before)        # skipped: weights untouched
    assert scaler.get_scale() == 2.0 ** 14                   # halved twice
    assert _one_step(scaler, w, opt, 1.0)                    # unscaled gradient 1.0, lr 0.1
    np.testing.assert_allclose(w.data, 0.9, rtol=1e-6)


def test_scale_doubles_after_growth_interval_good_steps_and_an_overflow_resets_the_count():
    w = mm.Tensor(np.ones(2, dtype=np.float32), requires_grad=True)
    opt = optim.SGD([w], lr=0.0)
    scaler = optim.GradScaler(init_scale=8.0, growth_interval=3)
    for _ in range(2):
        _one_step(scaler, w, opt, 1.0)
    assert scaler.get_scale() == 8.0
    _one_step(scaler, w, opt, np.inf)                        # overflow: halve, count restarts
    assert scaler.get_scale() == 4.0
    for _ in range(2):
        _one_step(scaler, w, opt, 1.0)
    assert scaler.get_scale() == 4.0
    _one_step(scaler, w, opt, 1.0)                           # third good step in a row
    assert scaler.get_scale() == 8.0
    assert optim.GradScaler().growth_interval == 2000


def test_state_dict_round_trip_and_misuse():
    w = mm.Tensor(np.ones(2, dtype=np.float32), requires_grad=True)
    opt = optim.SGD([w], lr=0.0)
    scaler = optim.GradScaler(init_scale=32.0, growth_interval=5)
    _one_step(scaler, w, opt, 1.0)
    _one_step(scaler, w, opt, np.nan)
    _one_step(scaler, w, opt, 1.0)
    restored = optim.GradScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict() == {
        "scale": 16.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 5,
        "growth_tracker": 1, "enabled": True}
    w.grad = np.ones(2, dtype=np.float32)
    restored.unscale_(opt)
    with pytest.raises(RuntimeError, match="already"):
        restored.unscale_(opt)
    with pytest.raises(RuntimeError, match="without a step"):
        optim.GradScaler().update()
    with pytest.raises(ValueError):
        optim.GradScaler(backoff_factor=1.5)


def test_autocast_is_gpu_only_and_checks_its_dtype():
    with pytest.raises(ValueError, match="bf16"):
        with mm.autocast("int8"):
            pass
    if mm.backend.cuda_available():
        pytest.skip("the CPU error needs a machine without a GPU")
    with pytest.raises(RuntimeError, match="GPU"):
        with mm.autocast("bf16"):
            pass
