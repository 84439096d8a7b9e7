"""Scaled dot-product attention: fused op vs a plain NumPy formula, gradcheck, fused == composed."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import functional as F
from minillm.ops import attention
from minillm.ops.attention import causal_mask

from helpers import as_np, t

RNG = np.random.default_rng(0)


def reference_attention(q, k, v, causal=True, scale=None, keep=None, p=0.0):
    """Plain NumPy, float64, loops over nothing clever: the formula as written."""
    tq, tk = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("...id,...jd->...ij", q, k) * scale
    if causal:
        i = np.arange(tq)[:, None] + (tk - tq)             # query i sits at position i + Tk - Tq
        j = np.arange(tk)[None, :]
        scores = np.where(j > i, -np.inf, scores)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    if keep is not None:
        weights = weights * keep / (1 - p)
    return np.einsum("...ij,...jd->...id", weights, v)


def qkv(lead, tq, tk, d, dv=None, device="cpu"):
    arrays = (RNG.standard_normal(lead + (tq, d)), RNG.standard_normal(lead + (tk, d)),
              RNG.standard_normal(lead + (tk, dv or d)))
    return arrays, tuple(t(a, device) for a in arrays)


def keep_mask_for(seed, shape, p, device):
    """The dropout mask the ops must use after mm.manual_seed(seed): uniform float32 draws >= p."""
    mm.manual_seed(seed)
    draws = mm.backend.random_uniform(shape, device=mm.backend.parse_device(device), dtype=np.float32)
    return mm.backend.to_numpy(draws) >= p


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lead,tq,tk", [((), 5, 5), ((3,), 4, 4), ((2, 3), 6, 6), ((2, 2), 3, 7), ((1,), 1, 9)])
def test_forward_matches_numpy(lead, tq, tk, causal, device):
    (q, k, v), (tq_, tk_, tv_) = qkv(lead, tq, tk, 4, dv=3, device=device)
    out = F.scaled_dot_product_attention(tq_, tk_, tv_, causal=causal)
    assert out.shape == lead + (tq, 3)
    np.testing.assert_allclose(as_np(out), reference_attention(q, k, v, causal), rtol=1e-10, atol=1e-12)


def test_causal_first_query_sees_only_the_first_key(device):
    (q, k, v), tensors = qkv((2, 3), 5, 5, 4, device=device)
    out = as_np(F.scaled_dot_product_attention(*tensors, causal=True))
    np.testing.assert_allclose(out[..., 0, :], v[..., 0, :], rtol=1e-12)


def test_kv_cache_decoding_equals_the_last_rows_of_full_attention(device):
    """Tq < Tk: the queries are the last Tq positions, exactly as in the full causal pass."""
    (q, k, v), (tq, tk, tv) = qkv((2, 2), 7, 7, 4, device=device)
    full = as_np(F.scaled_dot_product_attention(tq, tk, tv, causal=True))
    last3 = F.scaled_dot_product_attention(t(q[..., 4:, :], device), tk, tv, causal=True)
    np.testing.assert_allclose(as_np(last3), full[..., 4:, :], rtol=1e-12, atol=1e-14)


def test_custom_scale(device):
    (q, k, v), tensors = qkv((2,), 4, 4, 3, device=device)
    out = F.scaled_dot_product_attention(*tensors, causal=False, scale=0.7)
    np.testing.assert_allclose(as_np(out), reference_attention(q, k, v, False, scale=0.7), rtol=1e-10)


def test_float32_stays_float32_and_is_close(device):
    (q, k, v), _ = qkv((2, 3), 16, 16, 8)
    tensors = [mm.Tensor(a.astype(np.float32), requires_grad=True, device=device) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*tensors)
    assert out.dtype == np.float32
    np.testing.assert_allclose(as_np(out), reference_attention(q, k, v), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(x.grad.dtype == np.float32 for x in tensors)


def test_large_scores_are_stable(device):
    (q, k, v), _ = qkv((1,), 4, 4, 2)
    q, k = q * 300, k * 300                                 # scores ~1e5: exp would overflow unshifted
    out = F.scaled_dot_product_attention(t(q, device), t(k, device), t(v, device), causal=False)
    assert np.isfinite(as_np(out)).all()
    np.testing.assert_allclose(as_np(out), reference_attention(q, k, v, False), rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2).map(tuple), tq=st.integers(1, 5), extra=st.integers(0, 3),
       d=st.integers(1, 4), dv=st.integers(1, 4), causal=st.booleans())
def test_forward_and_backward_on_random_shapes(lead, tq, extra, d, dv, causal, device):
    (q, k, v), tensors = qkv(lead, tq, tq + extra, d, dv=dv, device=device)
    out = F.scaled_dot_product_attention(*tensors, causal=causal)
    np.testing.assert_allclose(as_np(out), reference_attention(q, k, v, causal), rtol=1e-10, atol=1e-12)
    assert mm.gradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, causal=causal), *tensors,
                        elementwise_max=64)


# ------------------------------------------------------------------ backward


@pytest.mark.parametrize("causal,tq,tk", [(True, 4, 4), (False, 4, 4), (True, 2, 5), (False, 3, 5)])
def test_gradcheck(causal, tq, tk, device):
    _, tensors = qkv((2, 2), tq, tk, 3, device=device)
    assert mm.gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal), *tensors)


def test_gradcheck_with_dropout(device):
    _, tensors = qkv((2, 2), 4, 4, 3, device=device)

    def attention(q, k, v):
        mm.manual_seed(7)                                   # the same mask on every call
        return F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.3)

    assert mm.gradcheck(attention, *tensors)


def test_gradient_of_only_some_inputs(device):
    (q, k, v), _ = qkv((2,), 3, 3, 2)
    tq_, tk_, tv_ = t(q, device), t(k, device, requires_grad=False), t(v, device)
    F.scaled_dot_product_attention(tq_, tk_, tv_).sum().backward()
    assert tk_.grad is None and tq_.grad is not None and tv_.grad is not None
    assert mm.gradcheck(lambda a, c: F.scaled_dot_product_attention(a, tk_, c), tq_, tv_)


@pytest.mark.parametrize("recompute", [False, True])
def test_backward_keeps_at_most_one_attention_sized_float_buffer(recompute, device, monkeypatch):
    """Memory: of the (…, Tq, Tk) arrays, only P (or nothing, when P is recomputed in backward)
    and the bool dropout mask are kept for backward."""
    monkeypatch.setitem(attention.RECOMPUTE_PROBS, device.split(":")[0], recompute)
    _, tensors = qkv((2, 3), 6, 6, 4, device=device)
    for p, expected_bool in ((0.0, 0), (0.5, 1)):
        out = F.scaled_dot_product_attention(*tensors, dropout_p=p)
        big = [a for a in out._ctx.saved if hasattr(a, "shape") and a.shape[-2:] == (6, 6)]
        assert sum(a.dtype.kind == "f" for a in big) == (0 if recompute else 1)
        assert sum(a.dtype == np.bool_ for a in big) == expected_bool


# ------------------------------------------------------------------ causal query blocks (CPU)


@pytest.mark.parametrize("rows,scores", [(1, 1), (2, 10), (3, 1000)])
@pytest.mark.parametrize("causal,tq,tk,p", [(True, 7, 7, 0.0), (True, 3, 7, 0.0), (True, 5, 6, 0.3),
                                            (False, 5, 4, 0.0), (False, 4, 4, 0.3)])
def test_cpu_tiles_give_the_same_function(rows, scores, causal, tq, tk, p, monkeypatch):
    """On the CPU attention runs tile by tile (skipping masked keys); values and grads are unchanged."""
    from minillm.ops import attention  # noqa: PLC0415

    monkeypatch.setattr(attention, "CPU_TILE_ROWS", rows)
    monkeypatch.setattr(attention, "CPU_TILE_SCORES", scores)
    tiles = attention._tiles(4, tq, tk, causal, "cpu")
    covered = np.zeros((4, tq, tk), int)
    for b0, b1, r0, r1, k_end in tiles:
        covered[b0:b1, r0:r1, :k_end] += 1
    needed = ~causal_mask(tq, tk) if causal else np.ones((tq, tk), bool)
    assert covered.max() == 1 and (covered[:, needed] == 1).all()   # each needed score exactly once
    (q, k, v), tensors = qkv((2, 2), tq, tk, 3)
    keep = keep_mask_for(5, (2, 2, tq, tk), p, "cpu") if p else None
    mm.manual_seed(5)
    out = F.scaled_dot_product_attention(*tensors, causal=causal, dropout_p=p)
    np.testing.assert_allclose(as_np(out), reference_attention(q, k, v, causal, keep=keep, p=p), rtol=1e-10)

    def attention_fn(a, b, c):
        mm.manual_seed(5)
        return F.scaled_dot_product_attention(a, b, c, causal=causal, dropout_p=p)

    assert mm.gradcheck(attention_fn, *tensors)


def test_default_tiles_on_a_longer_sequence(monkeypatch):
    """T = 150 with the default tiles (CPU_TILE_ROWS = 128 query rows): rows 0-127 over keys 0-127,
    then rows 128-149 over all 150 keys; against the formula and the composed op."""
    used = []
    real_tile_groups = attention._tile_groups
    monkeypatch.setattr(attention, "_tile_groups", lambda *a, **kw: used.append(real_tile_groups(*a, **kw)) or used[-1])
    (q, k, v), _ = qkv((1, 2), 150, 150, 8)
    results = []
    for fn in (F.scaled_dot_product_attention, F.scaled_dot_product_attention_composed):
        tensors = [t(a) for a in (q, k, v)]
        out = fn(*tensors)
        out.backward(np.cos(np.arange(out.size)).reshape(out.shape))
        results.append([as_np(out)] + [x.grad for x in tensors])
    np.testing.assert_allclose(results[0][0], reference_attention(q, k, v), rtol=1e-10, atol=1e-12)
    for fused, composed in zip(results[0], results[1]):
        np.testing.assert_allclose(fused, composed, rtol=1e-9, atol=1e-11)
    assert sorted({tile[2:] for group in used[0] for tile in group}) == [(0, 128, 128), (128, 150, 150)]


@pytest.mark.parametrize("recompute", [False, True])
def test_products_and_softmax_passes_per_tile(recompute, monkeypatch):
    """What the module docstring and docs/autograd.md count, per tile (a GPU call is one tile):
    forward 2 GEMMs (S = sQ Kᵀ, O = P̃ V) + 1 softmax pass; backward 4 GEMMs (dV, dP̃, dQ, dK) + the
    softmax-backward pass when P is kept, 5 GEMMs + 2 passes when P is recomputed first."""
    assert attention.RECOMPUTE_PROBS == {"cpu": False, "cuda": True}   # the documented policy
    monkeypatch.setitem(attention.RECOMPUTE_PROBS, "cpu", recompute)
    calls = []

    def counted(name):
        real = getattr(attention, name)
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)

    for name in ("_grouped_matmul", "_group_summed_matmul", "_matmul_into_heads", "_softmax_rows_",
                 "_softmax_rows_backward_"):
        monkeypatch.setattr(attention, name, counted(name))
    _, tensors = qkv((2, 3), 6, 6, 4)
    out = F.scaled_dot_product_attention(*tensors)
    tiles = sum(len(group) for group in out._ctx.saved[-1])
    forward, calls[:] = list(calls), []
    out.backward(np.ones(out.shape))

    def gemms(names):
        return sum(n in ("_grouped_matmul", "_group_summed_matmul", "_matmul_into_heads") for n in names)

    assert (gemms(forward), forward.count("_softmax_rows_")) == (2 * tiles, tiles)
    assert gemms(calls) == (5 if recompute else 4) * tiles
    assert (calls.count("_softmax_rows_"), calls.count("_softmax_rows_backward_")) == (tiles if recompute else 0, tiles)


# ------------------------------------------------------------------ dropout


def test_dropout_uses_the_seeded_keep_mask(device):
    (q, k, v), tensors = qkv((2, 3), 5, 5, 4, device=device)
    p = 0.4
    keep = keep_mask_for(3, (2, 3, 5, 5), p, device)
    mm.manual_seed(3)
    out = F.scaled_dot_product_attention(*tensors, dropout_p=p)
    np.testing.assert_allclose(as_np(out), reference_attention(q, k, v, True, keep=keep, p=p), rtol=1e-10)
    assert 0.2 < 1 - keep.mean() < 0.6                      # the mask did drop something


def test_dropout_zero_equals_no_dropout(device):
    _, tensors = qkv((2,), 4, 4, 3, device=device)
    a = F.scaled_dot_product_attention(*tensors, dropout_p=0.0)
    b = F.scaled_dot_product_attention(*tensors)
    np.testing.assert_array_equal(as_np(a), as_np(b))


# ------------------------------------------------------------------ fused == composed


@pytest.mark.parametrize("causal,tq,tk,p", [(True, 5, 5, 0.0), (False, 4, 6, 0.0), (True, 3, 6, 0.0),
                                            (True, 5, 5, 0.25), (False, 4, 4, 0.5)])
def test_fused_equals_composed_values_and_grads(causal, tq, tk, p, device):
    (q, k, v), _ = qkv((2, 3), tq, tk, 4, dv=3)
    results = []
    for fn in (F.scaled_dot_product_attention, F.scaled_dot_product_attention_composed):
        tensors = [t(a, device) for a in (q, k, v)]
        mm.manual_seed(11)                                  # seed, run, reseed, run: the same mask
        out = fn(*tensors, causal=causal, dropout_p=p)
        cotangent = RNG.standard_normal(out.shape) if not results else results[0][1]
        out.backward(mm.backend.to_device(cotangent, out.device))
        results.append((as_np(out), cotangent, [as_np(x.grad) for x in tensors]))
    (fused, _, fused_grads), (composed, _, composed_grads) = results
    np.testing.assert_allclose(fused, composed, rtol=1e-10, atol=1e-12)
    for g_fused, g_composed in zip(fused_grads, composed_grads):
        np.testing.assert_allclose(g_fused, g_composed, rtol=1e-9, atol=1e-11)


def test_composed_gradcheck(device):
    _, tensors = qkv((2,), 4, 4, 3, device=device)
    assert mm.gradcheck(lambda q, k, v: F.scaled_dot_product_attention_composed(q, k, v), *tensors)


# ------------------------------------------------------------------ errors and helpers


@pytest.mark.parametrize("fn", [F.scaled_dot_product_attention, F.scaled_dot_product_attention_composed])
def test_errors(fn, device):
    _, (q, k, v) = qkv((2,), 4, 4, 3, device=device)
    with pytest.raises(ValueError, match="more queries"):
        fn(t(np.ones((2, 5, 3)), device), k, v, causal=True)
    with pytest.raises(ValueError, match="same last dim"):
        fn(t(np.ones((2, 4, 2)), device), k, v)
    with pytest.raises(ValueError, match="same length"):
        fn(q, k, t(np.ones((2, 3, 3)), device))
    with pytest.raises(ValueError, match="leading dims"):
        fn(t(np.ones((3, 4, 3)), device), k, v)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fn(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="must be a Tensor"):
        fn(np.ones((2, 4, 3)), k, v)


def test_causal_mask():
    np.testing.assert_array_equal(causal_mask(3, 3), np.triu(np.ones((3, 3), bool), 1))
    np.testing.assert_array_equal(causal_mask(2, 4), [[0, 0, 0, 1], [0, 0, 0, 0]])
    assert causal_mask(3, 3) is causal_mask(3, 3)           # cached per (Tq, Tk, device)
    with pytest.raises(ValueError):
        causal_mask(3, 3)[0, 0] = True                      # the cached mask is read-only


def test_gpu_kernels_equal_the_array_module_version(gpu):
    """The CUDA row kernels (mask + softmax, softmax backward) against the NumPy path, float32 and float64."""
    import cupy  # noqa: PLC0415

    from minillm.ops import attention  # noqa: PLC0415

    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        for causal, tq, tk in ((True, 37, 37), (True, 5, 300), (False, 7, 2000), (True, 1, 1)):
            scores = RNG.standard_normal((2, 3, tq, tk)).astype(dtype) * 3
            grad = RNG.standard_normal((2, 3, tq, tk)).astype(dtype)
            keep = RNG.random((2, 3, tq, tk)) >= 0.3
            probs_cpu = attention._softmax_rows_(scores.copy(), causal)
            probs_gpu = attention._softmax_rows_(cupy.asarray(scores), causal)
            np.testing.assert_allclose(cupy.asnumpy(probs_gpu), probs_cpu, rtol=tol, atol=tol)
            for mask in (None, keep):
                scale = dtype(1 / 0.7)
                expected = attention._softmax_rows_backward_(grad.copy(), probs_cpu, causal, mask, scale)
                got = attention._softmax_rows_backward_(
                    cupy.asarray(grad), cupy.asarray(probs_cpu), causal,
                    None if mask is None else cupy.asarray(mask), scale)
                np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_recomputing_probabilities_in_backward_gives_the_same_gradients(p, device, monkeypatch):
    """The GPU's policy (recompute P in backward instead of saving it) equals saving it."""
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal((2, 3, 5, 4)) for _ in range(3)]

    def grads(recompute):
        monkeypatch.setitem(attention.RECOMPUTE_PROBS, device.split(":")[0], recompute)
        q, k, v = (mm.Tensor(a, requires_grad=True, device=device) for a in arrays)
        mm.manual_seed(11)
        out = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=p)
        out.backward(mm.backend.module_for(q.device).ones_like(out.data))
        return [mm.backend.to_numpy(t.grad) for t in (q, k, v)]

    for saved, recomputed in zip(grads(False), grads(True)):
        np.testing.assert_allclose(recomputed, saved, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ grouped-query attention


def repeat_heads(x, group):
    """(…, Hkv, T, D) -> (…, Hkv·G, T, D): each key/value head repeated for its G query heads."""
    return np.repeat(x, group, axis=-3)


def gqa_arrays(lead, hq, hkv, tq, tk, d=3, dv=2, device="cpu"):
    arrays = (RNG.standard_normal(lead + (hq, tq, d)), RNG.standard_normal(lead + (hkv, tk, d)),
              RNG.standard_normal(lead + (hkv, tk, dv)))
    return arrays, tuple(t(a, device) for a in arrays)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lead,hq,hkv,tq,tk", [((2,), 4, 2, 5, 5), ((), 6, 2, 3, 7), ((1,), 4, 1, 1, 6),
                                               ((2,), 3, 3, 4, 4)])
def test_gqa_equals_attention_over_repeated_heads(lead, hq, hkv, tq, tk, causal, device):
    """Values: the reference repeats k and v per group; gradients: dK, dV are the group sums of
    the repeated-head gradients (the plain op run on explicitly repeated k, v)."""
    (q, k, v), tensors = gqa_arrays(lead, hq, hkv, tq, tk, device=device)
    group = hq // hkv
    out = F.scaled_dot_product_attention(*tensors, causal=causal)
    assert out.shape == lead + (hq, tq, 2)
    np.testing.assert_allclose(as_np(out), reference_attention(q, repeat_heads(k, group), repeat_heads(v, group),
                                                               causal), rtol=1e-10, atol=1e-12)
    cotangent = RNG.standard_normal(out.shape)
    out.backward(mm.backend.to_device(cotangent, out.device))
    repeated = [t(q, device), t(repeat_heads(k, group), device), t(repeat_heads(v, group), device)]
    F.scaled_dot_product_attention(*repeated, causal=causal).backward(mm.backend.to_device(cotangent, out.device))
    np.testing.assert_allclose(as_np(tensors[0].grad), as_np(repeated[0].grad), rtol=1e-10, atol=1e-12)
    for grouped, plain in zip(tensors[1:], repeated[1:]):
        summed = as_np(plain.grad).reshape(lead + (hkv, group) + plain.shape[-2:]).sum(axis=-3)
        np.testing.assert_allclose(as_np(grouped.grad), summed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal,tq,tk", [(True, 4, 4), (False, 3, 5), (True, 2, 5)])
def test_gqa_gradcheck(causal, tq, tk, device):
    _, tensors = gqa_arrays((2,), 4, 2, tq, tk, device=device)
    assert mm.gradcheck(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal), *tensors)


@pytest.mark.parametrize("rows,scores", [(1, 1), (2, 10), (3, 1000)])
@pytest.mark.parametrize("causal,tq,tk,p", [(True, 5, 5, 0.0), (True, 3, 6, 0.3), (False, 4, 4, 0.0)])
def test_gqa_cpu_tiles_give_the_same_function(rows, scores, causal, tq, tk, p, monkeypatch):
    """Tiles of some query rows cannot merge the group axis (broadcast path); all rows can (one GEMM)."""
    monkeypatch.setattr(attention, "CPU_TILE_ROWS", rows)
    monkeypatch.setattr(attention, "CPU_TILE_SCORES", scores)
    (q, k, v), tensors = gqa_arrays((2,), 6, 2, tq, tk)
    keep = keep_mask_for(5, (2, 6, tq, tk), p, "cpu") if p else None
    mm.manual_seed(5)
    out = F.scaled_dot_product_attention(*tensors, causal=causal, dropout_p=p)
    expected = reference_attention(q, repeat_heads(k, 3), repeat_heads(v, 3), causal, keep=keep, p=p)
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-10)

    def attention_fn(a, b, c):
        mm.manual_seed(5)
        return F.scaled_dot_product_attention(a, b, c, causal=causal, dropout_p=p)

    assert mm.gradcheck(attention_fn, *tensors)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gqa_fused_equals_composed(p, device):
    (q, k, v), _ = gqa_arrays((2,), 6, 3, 4, 5)
    results = []
    for fn in (F.scaled_dot_product_attention, F.scaled_dot_product_attention_composed):
        tensors = [t(a, device) for a in (q, k, v)]
        mm.manual_seed(11)
        out = fn(*tensors, causal=True, dropout_p=p)
        out.backward(mm.backend.to_device(np.cos(np.arange(out.size)).reshape(out.shape), out.device))
        results.append([as_np(out)] + [as_np(x.grad) for x in tensors])
    for fused, composed in zip(*results):
        np.testing.assert_allclose(fused, composed, rtol=1e-9, atol=1e-11)


def test_gqa_keeps_the_keys_and_values_it_was_given(device):
    """No repeated copy: what backward keeps of k and v is a view of the caller's arrays."""
    _, (q, k, v) = gqa_arrays((2,), 8, 2, 5, 5, device=device)
    out = F.scaled_dot_product_attention(q, k, v)
    _, k3, v3 = out._ctx.saved[:3]
    assert k3.size == k.data.size and v3.size == v.data.size        # not repeated per query head
    xp = mm.backend.module_for(device)
    assert xp.shares_memory(k3, k.data) and xp.shares_memory(v3, v.data)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 2), hkv=st.integers(1, 3), group=st.integers(1, 3), tq=st.integers(1, 4),
       extra=st.integers(0, 3), causal=st.booleans())
def test_gqa_random_shapes(batch, hkv, group, tq, extra, causal, device):
    (q, k, v), tensors = gqa_arrays((batch,), hkv * group, hkv, tq, tq + extra, device=device)
    out = F.scaled_dot_product_attention(*tensors, causal=causal)
    expected = reference_attention(q, repeat_heads(k, group), repeat_heads(v, group), causal)
    np.testing.assert_allclose(as_np(out), expected, rtol=1e-10, atol=1e-12)
    assert mm.gradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, causal=causal), *tensors,
                        elementwise_max=48)


@pytest.mark.parametrize("fn", [F.scaled_dot_product_attention, F.scaled_dot_product_attention_composed])
def test_gqa_errors(fn):
    q, k, v = (t(np.ones(s)) for s in ((2, 6, 3, 4), (2, 4, 3, 4), (2, 4, 3, 4)))
    with pytest.raises(ValueError, match=r"key/value heads dividing the query heads.*\(2, 6, 3, 4\), \(2, 4, 3, 4\)"):
        fn(q, k, v)
    with pytest.raises(ValueError, match="k and v must share"):
        fn(q, t(np.ones((2, 2, 3, 4))), t(np.ones((2, 3, 3, 4))))
    with pytest.raises(ValueError, match="differ only in the head axis"):
        fn(q, t(np.ones((1, 2, 3, 4))), t(np.ones((1, 2, 3, 4))))


# ------------------------------------------------------------------ the CPU's C++ row kernels


def cpu_kernels_or_skip(on, dtype=np.float64):
    """``cpu.use_cpu_kernels(on)``; with ``on``, skipped where the row kernels cannot be built."""
    from minillm.kernels import attention as kernels, cpu  # noqa: PLC0415

    if on:
        with cpu.use_cpu_kernels(True):
            if not kernels.cpu_softmax_usable(np.zeros((1, 1), dtype)):
                pytest.skip("no C++ compiler: the CPU row kernels cannot be built")
    return cpu.use_cpu_kernels(on)


def counting_row_kernels(monkeypatch):
    """Counts the calls of the CPU row kernels (forward, backward), which still run."""
    from minillm.kernels import attention as kernels  # noqa: PLC0415

    counts = {"cpu_softmax_forward_": 0, "cpu_softmax_backward_": 0}

    def counted(name):
        real = getattr(kernels, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in counts:
        monkeypatch.setattr(kernels, name, counted(name))
    return counts


@pytest.mark.parametrize("on", [True, False], ids=["kernels", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv,tq,tk", [(2, 2, 1, 1), (2, 2, 3, 3), (4, 2, 129, 129), (2, 2, 257, 257),
                                         (6, 2, 3, 8), (2, 1, 130, 257)])
def test_fused_equals_composed_with_and_without_cpu_kernels(on, dtype, causal, hq, hkv, tq, tk, monkeypatch):
    """Odd lengths (tiles of 128 query rows: 129 and 257 leave tiles of one row), grouped-query heads,
    Tq < Tk (the queries are the last positions); forward and dq, dk, dv equal the composed op's,
    whose softmax is NumPy's. ``on``: the row kernels ran on every tile; off: never."""
    rng = np.random.default_rng(tq * 7 + tk)
    arrays = [rng.standard_normal((2, h, t_, 8)) * 2 for h, t_ in ((hq, tq), (hkv, tk), (hkv, tk))]
    cotangent = rng.standard_normal((2, hq, tq, 8))
    counts = counting_row_kernels(monkeypatch)
    results = []
    with cpu_kernels_or_skip(on, dtype):
        for fn in (F.scaled_dot_product_attention, F.scaled_dot_product_attention_composed):
            tensors = [mm.Tensor(a.astype(dtype), requires_grad=True) for a in arrays]
            out = fn(*tensors, causal=causal)
            if fn is F.scaled_dot_product_attention:
                tiles = sum(len(group) for group in out._ctx.saved[-1])
            out.backward(cotangent.astype(dtype))
            results.append([out.data] + [x.grad for x in tensors])
    assert all(a.dtype == dtype for a in results[0])
    expected = {"cpu_softmax_forward_": tiles, "cpu_softmax_backward_": tiles} if on else \
        {"cpu_softmax_forward_": 0, "cpu_softmax_backward_": 0}
    assert counts == expected
    rtol = 1e-10 if dtype == np.float64 else 1e-5                 # float32: sums of 257 rounded terms
    for fused, composed in zip(*results):
        np.testing.assert_allclose(fused, composed, rtol=rtol, atol=rtol * np.abs(composed).max())


@pytest.mark.parametrize("causal,hq,hkv,tq,tk", [(True, 4, 2, 5, 5), (True, 2, 2, 3, 6), (False, 4, 2, 4, 3)])
def test_gradcheck_with_cpu_kernels(causal, hq, hkv, tq, tk, monkeypatch):
    """Float64 central differences through the row kernels, with tiles of 2 query rows (offsets in
    the causal bound), and with dropout (the kernel applies the keep mask in backward)."""
    monkeypatch.setattr(attention, "CPU_TILE_ROWS", 2)
    _, tensors = gqa_arrays((2,), hq, hkv, tq, tk)
    counts = counting_row_kernels(monkeypatch)
    with cpu_kernels_or_skip(True):
        for p in (0.0, 0.3):
            def attention_fn(a, b, c):
                mm.manual_seed(7)
                return F.scaled_dot_product_attention(a, b, c, causal=causal, dropout_p=p)

            assert mm.gradcheck(attention_fn, *tensors)
    assert counts["cpu_softmax_forward_"] > 0 and counts["cpu_softmax_backward_"] > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_row_kernels_equal_the_numpy_passes_on_tile_views(dtype, causal):
    """The kernels on strided tiles of a (N, G, Tq, Tk) buffer, as the op hands them over, against
    the NumPy passes on copies: P (0 on masked keys), and dS with a dropout mask; nothing outside
    the tile is touched. Rows see 6..13 keys (causal) or 17, the vector loops' remainders included."""
    from minillm.kernels import attention as kernels  # noqa: PLC0415

    rng = np.random.default_rng(3)
    buffer = (rng.standard_normal((4, 2, 20, 23)) * 3).astype(dtype)
    grads = rng.standard_normal((4, 2, 20, 23)).astype(dtype)
    keep = rng.random((4, 2, 20, 23)) > 0.3
    tile = (slice(1, 3), slice(None), slice(5, 13), slice(None, 13 if causal else 17))
    before, grads_before = buffer.copy(), grads.copy()
    expected = buffer[tile].copy()
    attention._softmax_rows_cpu_(expected, causal)
    expected_grad = grads[tile].copy()
    attention._softmax_rows_backward_cpu_(expected_grad, expected, keep[tile], dtype(1.25))
    with cpu_kernels_or_skip(True, dtype):
        assert kernels.cpu_softmax_usable(buffer, grads)
        kernels.cpu_softmax_forward_(buffer[tile], causal)
        kernels.cpu_softmax_backward_(grads[tile], buffer[tile], causal, keep[tile], 1.25)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(buffer[tile], expected, rtol=rtol, atol=rtol * 1e-2)
    np.testing.assert_allclose(grads[tile], expected_grad, rtol=rtol, atol=rtol * 1e-2)
    if causal:                                          # tile row i sees keys j <= i + 5 of 13
        assert (buffer[tile][..., 13 - 8 + np.arange(8)[:, None] + 1 <= np.arange(13)] == 0).all()
    outside = np.ones(buffer.shape, bool)
    outside[tile] = False
    np.testing.assert_array_equal(buffer[outside], before[outside])
    np.testing.assert_array_equal(grads[outside], grads_before[outside])
