"""The GPU attention kernels (minillm/kernels/attention.py) against the NumPy formula and each other:
the flash kernels and the score-matrix path, values and gradients, causal and not, Tq < Tk, sizes
that are not multiples of the tiles, grouped-query attention, and the bf16/fp16 paths against fp32.
Run with ``pytest --device cuda`` (skipped on the CPU)."""

import math

import numpy as np
import pytest

import minillm as mm
from minillm import functional as F
from minillm.ops import attention

RNG = np.random.default_rng(7)


def reference(q, k, v, causal, scale=None):
    """float64 NumPy: softmax(mask(s Q Kᵀ)) V with k, v heads repeated for grouped queries."""
    group = q.shape[-3] // k.shape[-3]
    k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    tq, tk = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("...id,...jd->...ij", q, k) * scale
    if causal:
        scores = np.where(np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq), -np.inf, scores)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.einsum("...ij,...jd->...id", weights / weights.sum(axis=-1, keepdims=True), v)


def run(arrays, device, dtype, causal, path, monkeypatch, cotangent, autocast=None):
    """Output and (dq, dk, dv) of the fused op on ``device`` with GPU_ATTENTION = ``path``."""
    monkeypatch.setattr(attention, "GPU_ATTENTION", path)
    q, k, v = (mm.Tensor(a.astype(dtype), requires_grad=True, device=device) for a in arrays)
    if autocast:
        with mm.autocast(autocast):
            out = F.scaled_dot_product_attention(q, k, v, causal=causal)
    else:
        out = F.scaled_dot_product_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    assert out._ctx.flash == (path == "flash")
    out.backward(mm.backend.to_device(cotangent.astype(dtype), device))
    return [mm.backend.to_numpy(x).astype(np.float64) for x in (out.data, q.grad, k.grad, v.grad)]


def relative_error(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# (B, Hq, Hkv, Tq, Tk, D, Dv): tiles are 64 rows (and 16-64 keys), so 70 and 130 leave ragged
# tiles; Tq < Tk is KV-cache decoding; Hkv < Hq is grouped-query attention; D, Dv 5 and 3
# are padded to 16 inside the kernels, 64 and 128 are the real head sizes. From 256 query rows
# the score path splits causal queries into blocks (kernels/attention.py, SCORE_BLOCKS).
SHAPES = [(2, 3, 3, 70, 70, 8, 8), (1, 2, 2, 5, 130, 16, 16), (1, 4, 2, 33, 33, 5, 3),
          (1, 4, 1, 1, 77, 64, 64), (1, 2, 2, 130, 130, 64, 64), (1, 2, 1, 65, 100, 128, 128),
          (1, 2, 2, 300, 300, 16, 16), (2, 1, 1, 290, 333, 16, 8)]   # the last two: causal query blocks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("path", ["flash", "scores"])
def test_gpu_paths_equal_the_formula_float64(shape, causal, path, gpu, monkeypatch):
    """float64 end to end: both paths must match the formula (values) and central-difference-exact
    gradients (the float64 composed op's, checked against the reference) to rounding."""
    b, hq, hkv, tq, tk, d, dv = shape
    arrays = (RNG.standard_normal((b, hq, tq, d)), RNG.standard_normal((b, hkv, tk, d)),
              RNG.standard_normal((b, hkv, tk, dv)))
    cotangent = RNG.standard_normal((b, hq, tq, dv))
    got = run(arrays, gpu, np.float64, causal, path, monkeypatch, cotangent)
    np.testing.assert_allclose(got[0], reference(*arrays, causal), rtol=1e-10, atol=1e-10)
    # gradients: the composed op (autograd through primitives, on repeated heads) on the CPU
    group = hq // hkv
    q, k, v = (mm.Tensor(a, requires_grad=True) for a in arrays)
    k_rep, v_rep = (mm.Tensor(np.repeat(x.data, group, axis=1), requires_grad=True) for x in (k, v))
    F.scaled_dot_product_attention_composed(q, k_rep, v_rep, causal=causal).backward(cotangent)
    expected = [q.grad] + [x.grad.reshape(b, hkv, group, *x.shape[-2:]).sum(axis=2) for x in (k_rep, v_rep)]
    for g, e in zip(got[1:], expected):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_equals_scores_in_float32(causal, gpu, monkeypatch):
    """Two float32 algorithms for one function: different summation orders, so agreement to ~1e-6
    relative (float32 unit roundoff 6e-8 times a few hundred terms)."""
    arrays = tuple(RNG.standard_normal(s) for s in ((2, 4, 200, 64), (2, 2, 200, 64), (2, 2, 200, 64)))
    cotangent = RNG.standard_normal((2, 4, 200, 64))
    flash = run(arrays, gpu, np.float32, causal, "flash", monkeypatch, cotangent)
    scores = run(arrays, gpu, np.float32, causal, "scores", monkeypatch, cotangent)
    for a, b in zip(flash, scores):
        assert relative_error(a, b) < 2e-6


@pytest.mark.parametrize("path", ["flash", "scores"])
@pytest.mark.parametrize("reduced,tolerance", [("bf16", 1.5e-2), ("fp16", 2e-3)])
def test_autocast_attention_is_close_to_float32(path, reduced, tolerance, gpu, monkeypatch):
    """Under autocast q, k, v are rounded to bf16 (8 significant bits, unit roundoff 2^-8 = 3.9e-3)
    or fp16 (11 bits, 4.9e-4) and everything after that accumulates in float32. Rounding each
    operand moves a product by ~u·√2 relative; backward chains three such products (dS needs dP
    and P, dK needs dS and Q), so norm-wise errors of a few u: 1.5e-2 for bf16, 2e-3 for fp16.
    (The score path runs autocast on TF32 instead, 11 significant bits like fp16: inside both.)
    Outputs and gradients come back float32."""
    arrays = tuple(RNG.standard_normal(s) for s in ((2, 4, 150, 64), (2, 2, 150, 64), (2, 2, 150, 64)))
    cotangent = RNG.standard_normal((2, 4, 150, 64))
    exact = run(arrays, gpu, np.float32, True, path, monkeypatch, cotangent)
    reduced_run = run(arrays, gpu, np.float32, True, path, monkeypatch, cotangent, autocast=reduced)
    for a, b in zip(reduced_run, exact):
        assert relative_error(a, b) < tolerance


# (B, Hq, Hkv, Tq, Tk, D) for the tensor-core kernels (bf16/fp16, D = 32 or 64): query tiles of 64
# and key tiles of 32 (forward, dQ) or 64 keys and 32 queries (dK/dV), so 70, 130, 33, 129 and 200
# leave ragged tiles; Tq < Tk is the KV cache (causal offset); Hkv < Hq is grouped-query attention.
TC_SHAPES = [(2, 3, 3, 70, 70, 64), (1, 2, 2, 5, 130, 64), (1, 4, 2, 33, 33, 32), (1, 4, 1, 1, 77, 64),
             (1, 2, 2, 130, 130, 32), (2, 2, 1, 129, 200, 64)]


@pytest.mark.parametrize("shape", TC_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("reduced,tolerance", [("bf16", 1.5e-2), ("fp16", 2e-3)])
def test_tensor_core_flash_is_close_to_float32(shape, causal, reduced, tolerance, gpu, monkeypatch):
    """The tensor-core kernels under autocast against the float32 score-matrix path. Their products
    take bf16/fp16 operands and accumulate in float32, like the SIMT kernels' (same tolerances as
    test_autocast_attention_is_close_to_float32: a few units of roundoff through three chained
    products); P and dS are also rounded to the operand type before their products (u relative
    each), which stays inside that bound. The test also checks that these kernels ran."""
    from minillm.kernels import attention as kernels

    b, hq, hkv, tq, tk, d = shape
    arrays = (RNG.standard_normal((b, hq, tq, d)), RNG.standard_normal((b, hkv, tk, d)),
              RNG.standard_normal((b, hkv, tk, d)))
    cotangent = RNG.standard_normal((b, hq, tq, d))
    calls = []
    for name in ("_flash_tc_forward", "_flash_tc_backward"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    exact = run(arrays, gpu, np.float32, causal, "scores", monkeypatch, cotangent)
    assert calls == []
    monkeypatch.setattr(attention, "GPU_ATTENTION", "auto")   # auto picks the tensor cores for these
    q, k, v = (mm.Tensor(a.astype(np.float32), requires_grad=True, device=gpu) for a in arrays)
    with mm.autocast(reduced):
        out = F.scaled_dot_product_attention(q, k, v, causal=causal)
    out.backward(mm.backend.to_device(cotangent.astype(np.float32), gpu))
    assert calls == ["_flash_tc_forward", "_flash_tc_backward"]
    got = [mm.backend.to_numpy(x).astype(np.float64) for x in (out.data, q.grad, k.grad, v.grad)]
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, exact):
        assert relative_error(a, e) < tolerance, f"{name}: {relative_error(a, e):.2e}"


def test_flash_memory_is_linear_in_t(gpu, monkeypatch):
    """The flash path keeps O(T) for backward: q, k, v, the output and lse, no (T, T) array."""
    monkeypatch.setattr(attention, "GPU_ATTENTION", "flash")
    q, k, v = (mm.Tensor(RNG.standard_normal((1, 2, 300, 16)).astype(np.float32), requires_grad=True, device=gpu)
               for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    assert all(a is None or a.size <= 2 * 300 * 16 for a in out._ctx.saved)
