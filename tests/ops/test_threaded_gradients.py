"""Forward and backward of the ops whose CPU paths change with the input's size, at sizes that
take those paths, against plain float64 NumPy formulas (central differences are only
practical on small inputs).

What makes a path here: ops/common.py's PARALLEL_MIN_ELEMENTS (2^18 elements: rows shared
out between CPU threads), layer norm's row blocks (2^19 elements forward, 2^18 backward, so
blocks end inside a thread's rows), attention's CPU tiles (128 query rows, 2^18 scores,
matrices shared out between threads; grouped-query heads, Tq < Tk, dropout), cpu_matmul's
blocks (2^26 multiply-adds, or 2^22 once the threads are tuned), the threaded residual add,
the sorted scatter-add of a small vocabulary, and elementwise chains cut into blocks.
Inputs are float32 (what runs in training), some in non-contiguous layouts; tolerances are
float32's, scaled by each result's magnitude.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import minillm as mm
from minillm import functional as F
from minillm.kernels.cpu import enabled as cpu_kernels_enabled, use_cpu_kernels
from minillm.ops import common
from minillm.ops.attention import CPU_TILE_ROWS, dropout_keep_mask

from test_gradient_properties import CASES, _run


def f32(values, requires_grad=True):
    return mm.Tensor(np.asarray(values, dtype=np.float32), requires_grad=requires_grad)


def assert_close(got, expected, rtol=2e-4, scale_atol=2e-5, what=""):
    """|got - expected| <= rtol |expected| + scale_atol · max|expected| (float32 against float64)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, what
    atol = scale_atol * max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=what)


def test_the_sizes_below_take_the_threaded_paths():
    """The thresholds these tests are sized for (a change of them must resize the tests)."""
    assert common.PARALLEL_MIN_ELEMENTS == 1 << 18 and CPU_TILE_ROWS == 128
    assert common.row_ranges(1041, 768) == [slice(0, 520), slice(520, 1041)] or common.CPU_THREADS != 2


# ------------------------------------------------------------------ layer norm, rms norm


def layer_norm_reference(x, w, b, g, eps):
    """Values and (dx, dw, db) in float64, from the definition (x̂ = (x − μ)/σ) and its derivative."""
    mu = x.mean(-1, keepdims=True)
    r = 1 / np.sqrt(x.var(-1, keepdims=True) + eps)
    x_hat = (x - mu) * r
    g_w = g * w
    dx = r * (g_w - g_w.mean(-1, keepdims=True) - x_hat * (g_w * x_hat).mean(-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return x_hat * w + (0 if b is None else b), dx, (g * x_hat).sum(lead), g.sum(lead)


@pytest.mark.parametrize("kernels_on", [True, False], ids=["cpu_kernels", "numpy_path"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "no_bias", "grad_transposed"])
def test_layer_norm_in_threads_and_row_blocks(layout, kernels_on):
    """(3, 347, 768): 1,041 rows, two threads of ~520 rows, each in blocks of 682 rows forward
    and 341 backward (so the last block of each thread is short). Also x a transposed view, and
    the incoming gradient one (y read through a transpose). With the C++ kernels on, a
    non-contiguous x takes the NumPy path; the others take the kernels."""
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((3, 347, 768)) * 2 + rng.standard_normal((3, 347, 1)) * 3
    w64, b64 = rng.standard_normal(768), rng.standard_normal(768)
    g64 = rng.standard_normal(x64.shape)
    if layout == "transposed":                       # x a transposed view made in the graph
        leaf = f32(x64.transpose(2, 1, 0))
        x = leaf.transpose(2, 1, 0)
    else:
        leaf = x = f32(x64)
    w, b = f32(w64), (None if layout == "no_bias" else f32(b64))
    with use_cpu_kernels(kernels_on):
        y = F.layer_norm(x, w, b, eps=1e-5)
        assert y._ctx.fused == (kernels_on and x.data.flags.c_contiguous and cpu_kernels_enabled())
        if layout == "grad_transposed":
            y.transpose(2, 1, 0).backward(g64.astype(np.float32).transpose(2, 1, 0).copy())
        else:
            y.backward(g64.astype(np.float32))
    x32 = x64.astype(np.float32).astype(np.float64)
    value, dx, dw, db = layer_norm_reference(x32, w64.astype(np.float32), None if b is None else b64.astype(np.float32),
                                             g64.astype(np.float32), 1e-5)
    assert_close(y.data, value, what="value")
    grad_x = leaf.grad.transpose(2, 1, 0) if layout == "transposed" else leaf.grad
    assert_close(grad_x, dx, what="dx")
    assert_close(w.grad, dw, what="dw")
    if b is not None:
        assert_close(b.grad, db, what="db")


@pytest.mark.parametrize("kernels_on", [True, False], ids=["cpu_kernels", "numpy_path"])
def test_rms_norm_large(kernels_on):
    rng = np.random.default_rng(1)
    x64, w64, g64 = rng.standard_normal((1100, 384)) * 3, rng.standard_normal(384), rng.standard_normal((1100, 384))
    x, w = f32(x64), f32(w64)
    with use_cpu_kernels(kernels_on):
        y = F.rms_norm(x, w, eps=1e-6)
        y.backward(g64.astype(np.float32))
    r = 1 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6)
    x_hat = x64 * r
    g_w = g64 * w64
    assert_close(y.data, x_hat * w64, what="value")
    assert_close(x.grad, r * (g_w - x_hat * (g_w * x_hat).mean(-1, keepdims=True)), what="dx")
    assert_close(w.grad, (g64 * x_hat).sum(0), what="dw")


# ------------------------------------------------------------------ attention


def attention_reference(q, k, v, g, causal, keep=None, p=0.0):
    """O and (dQ, dK, dV) for (B, Hq, Tq, D) queries and (B, Hkv, Tk, ·) keys/values in float64,
    with the key/value heads repeated for grouped-query attention (and summed back after)."""
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    s = 1 / math.sqrt(d)
    scores = np.einsum("bhid,bhjd->bhij", q, k_rep) * s
    if causal:
        scores = np.where(np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq), -np.inf, scores)
    p_soft = np.exp(scores - scores.max(-1, keepdims=True))
    p_soft /= p_soft.sum(-1, keepdims=True)
    dropped = p_soft if keep is None else p_soft * keep / (1 - p)
    out = dropped @ v_rep
    dv = dropped.swapaxes(-1, -2) @ g
    d_dropped = g @ v_rep.swapaxes(-1, -2)
    dp = d_dropped if keep is None else d_dropped * keep / (1 - p)
    ds = p_soft * (dp - (dp * p_soft).sum(-1, keepdims=True))
    dq = ds @ k_rep * s
    dk = ds.swapaxes(-1, -2) @ q * s
    fold = lambda a: a.reshape(a.shape[0], k.shape[1], group, *a.shape[2:]).sum(2)  # noqa: E731
    return out, dq, fold(dk), fold(dv)


@pytest.mark.parametrize("causal, hq, hkv, tq, tk, p, model_layout", [
    (True, 4, 2, 200, 300, 0.2, False),   # GQA, queries the last 200 of 300 positions, dropout: tiles of 128 + 72 rows
    (False, 3, 3, 260, 260, 0.0, False),  # multi-head, (B, H) leading axes: O written heads-last
    (True, 3, 3, 260, 260, 0.3, True),    # the model's way: q, k, v strided views of one qkv array, O read as (B, T, C)
    (True, 6, 1, 150, 150, 0.0, False),   # one key/value head for six query heads
])
def test_attention_tiles_threads_gqa_and_dropout(causal, hq, hkv, tq, tk, p, model_layout):
    rng = np.random.default_rng(2)
    b, d = 2, 16
    q64 = rng.standard_normal((b, hq, tq, d))
    k64, v64 = rng.standard_normal((b, hkv, tk, d)), rng.standard_normal((b, hkv, tk, d))
    g64 = rng.standard_normal((b, hq, tq, d))
    assert b * hq * tq * tk >= common.PARALLEL_MIN_ELEMENTS         # the matrices shared out between threads
    if model_layout:                                  # (B, T, 3, H, D) -> three (B, H, T, D) views
        qkv = f32(np.stack([q64, k64, v64]).transpose(1, 3, 0, 2, 4))
        heads = qkv.transpose(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]
    else:
        q, k, v = f32(q64), f32(k64), f32(v64)
    mm.manual_seed(3)
    out = F.scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=p)
    if model_layout:                                  # (B, T, C): the gradient arrives as a strided view
        out.transpose(0, 2, 1, 3).reshape(b, tq, hq * d).backward(
            g64.astype(np.float32).transpose(0, 2, 1, 3).reshape(b, tq, hq * d))
    else:
        out.backward(g64.astype(np.float32))
    keep = None
    if p:
        mm.manual_seed(3)
        keep = dropout_keep_mask((b, hq, tq, tk), p, "cpu")
    value, dq, dk, dv = attention_reference(*(a.astype(np.float32).astype(np.float64) for a in (q64, k64, v64)),
                                            g64.astype(np.float32), causal, keep, p)
    assert_close(out.data, value, what="O")
    if model_layout:
        q_grad, k_grad, v_grad = qkv.grad.transpose(2, 0, 3, 1, 4)
    else:
        q_grad, k_grad, v_grad = q.grad, k.grad, v.grad
    assert_close(q_grad, dq, what="dQ")
    assert_close(k_grad, dk, what="dK")
    assert_close(v_grad, dv, what="dV")


def test_attention_gradient_of_one_input_only_in_threads():
    """Only K needs a gradient (the other two frozen): the backward's want_* branches, large."""
    rng = np.random.default_rng(4)
    q64, k64, v64, g64 = (rng.standard_normal((2, 4, 200, 16)) for _ in range(4))
    q, k, v = f32(q64, False), f32(k64), f32(v64, False)
    F.scaled_dot_product_attention(q, k, v, causal=True).backward(g64.astype(np.float32))
    assert q.grad is None and v.grad is None
    assert_close(k.grad, attention_reference(q64, k64, v64, g64, True)[2], what="dK")


# ------------------------------------------------------------------ products


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_matmul_backward_through_cpu_matmul_blocks(layout):
    """(600, 300) @ (300, 500): 9·10⁷ multiply-adds per product, above cpu_matmul's threshold,
    so dA = dZ Bᵀ and dB = Aᵀ dZ (transposed views) run in blocks of rows or columns."""
    rng = np.random.default_rng(5)
    a64, b64, g64 = rng.standard_normal((600, 300)), rng.standard_normal((300, 500)), rng.standard_normal((600, 500))
    if layout == "transposed":
        leaf_a, leaf_b = f32(a64.T), f32(b64.T)
        a, b = leaf_a.T, leaf_b.T
    else:
        leaf_a, leaf_b = a, b = f32(a64), f32(b64)
    z = a @ b
    z.backward(g64.astype(np.float32))
    grad_a = leaf_a.grad.T if layout == "transposed" else leaf_a.grad
    grad_b = leaf_b.grad.T if layout == "transposed" else leaf_b.grad
    assert_close(z.data, a64 @ b64, what="Z")
    assert_close(grad_a, g64 @ b64.T, what="dA")
    assert_close(grad_b, a64.T @ g64, what="dB")


def test_batched_matmul_broadcast_backward_large():
    """(4, 1, 200, 96) @ (3, 96, 128): both operands broadcast, batch gradients summed back."""
    rng = np.random.default_rng(6)
    a64, b64 = rng.standard_normal((4, 1, 200, 96)), rng.standard_normal((3, 96, 128))
    g64 = rng.standard_normal((4, 3, 200, 128))
    a, b = f32(a64), f32(b64)
    (a @ b).backward(g64.astype(np.float32))
    assert_close(a.grad, (g64 @ b64.swapaxes(-1, -2)).sum(axis=1, keepdims=True), what="dA")
    assert_close(b.grad, (a64.swapaxes(-1, -2) @ g64).sum(axis=0), what="dB")


@pytest.mark.parametrize("wanted", ["x", "weight", "weight_bias"])
def test_linear_with_some_inputs_frozen_large(wanted):
    """LoRA's frozen base (only x), a frozen input (weight and bias): each gradient alone, through
    cpu_matmul's blocks rather than cpu_matmul_pair (tests/ops/test_cpu_threads.py has all three)."""
    rng = np.random.default_rng(7)
    x64, w64, b64 = rng.standard_normal((8, 128, 96)), rng.standard_normal((1536, 96)), rng.standard_normal(1536)
    g64 = rng.standard_normal((8, 128, 1536))
    x, w, b = f32(x64, wanted == "x"), f32(w64, wanted != "x"), f32(b64, wanted == "weight_bias")
    F.linear(x, w, b).backward(g64.astype(np.float32))
    g2, x2 = g64.reshape(-1, 1536), x64.reshape(-1, 96)
    if wanted == "x":
        assert w.grad is None and b.grad is None
        assert_close(x.grad, (g2 @ w64).reshape(x.shape), what="dx")
    else:
        assert x.grad is None
        assert_close(w.grad, g2.T @ x2, what="dW")
        assert (b.grad is None) == (wanted == "weight")
        if b.grad is not None:
            assert_close(b.grad, g2.sum(0), what="db")


def test_residual_add_in_threads_passes_the_gradient_to_both():
    rng = np.random.default_rng(8)
    a64, b64, g64 = (rng.standard_normal((2048, 384)) for _ in range(3))
    a, b = f32(a64), f32(b64)
    y = a + b                                             # cpu_add: both cores
    y.backward(g64.astype(np.float32))
    np.testing.assert_array_equal(y.data, a64.astype(np.float32) + b64.astype(np.float32))
    np.testing.assert_array_equal(a.grad, g64.astype(np.float32))
    np.testing.assert_array_equal(b.grad, g64.astype(np.float32))
    assert not np.shares_memory(a.grad, b.grad)


# ------------------------------------------------------------------ elementwise chains in blocks


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gelu_both_forms_in_blocks_and_threads(approximate, layout):
    """3 blocks per thread (contiguous), or one whole-array call (a transposed view, whose gradient
    arrives transposed too)."""
    rng = np.random.default_rng(9)
    shape = (768, 3 * common.CPU_BLOCK_ELEMENTS // 768 * 2 + 5)
    x64, g64 = rng.standard_normal(shape) * 3, rng.standard_normal(shape)
    leaf = f32(x64.T if layout == "transposed" else x64)
    x = leaf.T if layout == "transposed" else leaf
    y = F.gelu(x, approximate=approximate)
    y.backward(g64.astype(np.float32))
    if approximate == "tanh":
        k, c = math.sqrt(2 / math.pi), 0.044715
        t = np.tanh(k * (x64 + c * x64 ** 3))
        value, slope = 0.5 * x64 * (1 + t), 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * k * (1 + 3 * c * x64 ** 2)
    else:
        cdf = 0.5 * np.vectorize(math.erfc)(-x64 / math.sqrt(2))
        value, slope = x64 * cdf, cdf + x64 * np.exp(-x64 * x64 / 2) / math.sqrt(2 * math.pi)
    grad = leaf.grad.T if layout == "transposed" else leaf.grad
    assert_close(y.data, value, what="value")
    assert_close(grad, g64 * slope, what="dx")


def test_silu_sigmoid_swiglu_large():
    rng = np.random.default_rng(10)
    h64, g64 = rng.standard_normal((512, 1024)) * 4, rng.standard_normal((512, 512))
    h = f32(h64)
    F.swiglu(h).backward(g64.astype(np.float32))
    a, b = h64[:, :512], h64[:, 512:]
    s = 1 / (1 + np.exp(-a))
    assert_close(h.grad, np.concatenate([g64 * b * (s + a * s * (1 - s)), g64 * a * s], axis=1), what="swiglu")
    x = f32(a)
    (F.silu(x) + F.sigmoid(x)).backward(g64.astype(np.float32))
    assert_close(x.grad, g64 * (s + a * s * (1 - s) + s * (1 - s)), what="silu + sigmoid")


# ------------------------------------------------------------------ softmax, cross-entropy


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_and_log_softmax_large(axis):
    rng = np.random.default_rng(11)
    x64, g64 = rng.standard_normal((8, 300, 256)) * 5, rng.standard_normal((8, 300, 256))
    x = f32(x64)
    p = np.exp(x64 - x64.max(axis, keepdims=True))
    p /= p.sum(axis, keepdims=True)
    F.softmax(x, axis=axis).backward(g64.astype(np.float32))
    assert_close(x.grad, p * (g64 - (g64 * p).sum(axis, keepdims=True)), what="softmax")
    x.grad = None
    F.log_softmax(x, axis=axis).backward(g64.astype(np.float32))
    assert_close(x.grad, g64 - p * g64.sum(axis, keepdims=True), what="log_softmax")


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cross_entropy_large(layout):
    """(4, 512, 300) logits, some targets ignored; also as a (T, B, C) leaf seen through a transpose."""
    rng = np.random.default_rng(12)
    z64 = rng.standard_normal((4, 512, 300)) * 3
    targets = rng.integers(0, 300, (4, 512))
    targets[rng.random((4, 512)) < 0.1] = -100
    leaf = f32(z64.transpose(1, 0, 2)) if layout == "transposed" else f32(z64)
    z = leaf.transpose(1, 0, 2) if layout == "transposed" else leaf
    loss = F.cross_entropy(z, targets)
    loss.backward()
    valid = targets != -100
    p = np.exp(z64 - z64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    picked = np.take_along_axis(np.log(p), np.where(valid, targets, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss.item(), -(picked * valid).sum() / valid.sum(), rtol=1e-5)
    one_hot = np.zeros_like(p)
    np.put_along_axis(one_hot, np.where(valid, targets, 0)[..., None], 1.0, -1)
    grad = leaf.grad.transpose(1, 0, 2) if layout == "transposed" else leaf.grad
    assert_close(grad, (p - one_hot) * valid[..., None] / valid.sum(), what="dz")


# ------------------------------------------------------------------ embedding's scatter-add


@pytest.mark.parametrize("vocab", [65, 50_000])        # sorted per-id sums, and np.add.at
def test_embedding_backward_small_and_large_vocabulary(vocab):
    rng = np.random.default_rng(13)
    ids = rng.integers(0, vocab, (8, 512))
    w64, g64 = rng.standard_normal((vocab, 48)), rng.standard_normal((8, 512, 48))
    w = f32(w64)
    F.embedding(ids, w).backward(g64.astype(np.float32))
    expected = np.zeros((vocab, 48))
    np.add.at(expected, ids.reshape(-1), g64.reshape(-1, 48))
    assert_close(w.grad, expected, what="dW")


# ------------------------------------------------------------------ the same paths at tiny sizes


def _tiny_thresholds(patch):
    """Every size threshold of the CPU paths lowered, so that tiny inputs (which central
    differences can check) are cut into threads, row blocks, attention tiles and product blocks."""
    from minillm.ops import attention, norm
    patch.setattr(common, "PARALLEL_MIN_ELEMENTS", 1)
    patch.setattr(attention, "PARALLEL_MIN_ELEMENTS", 1)
    patch.setattr(common, "PARALLEL_MIN_MULTIPLY_ADDS", 1)
    patch.setattr(common, "BLAS_THREADS_MIN_MULTIPLY_ADDS", 1)
    patch.setattr(common, "CPU_BLOCK_ELEMENTS", 2)
    patch.setattr(norm, "_BLOCK_ELEMENTS", 2)
    patch.setattr(attention, "CPU_TILE_ROWS", 1)
    patch.setattr(attention, "CPU_TILE_SCORES", 2)


THREADED_CASES = ["add", "operators", "matmul", "linear", "gelu_tanh", "gelu_none", "layer_norm",
                  "layer_norm_no_bias", "scaled_dot_product_attention", "embedding", "softmax", "cross_entropy"]


@pytest.mark.parametrize("name", THREADED_CASES)
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_threaded_paths_at_tiny_sizes_against_central_differences(name, data, monkeypatch):
    """tests/ops/test_gradient_properties.py's examples, run with the thresholds lowered: gradcheck,
    and the same values and gradients as with the usual thresholds (one thread, one block)."""
    case = CASES[name](data)
    inputs = [mm.Tensor(a, requires_grad=True) for a in case.arrays]
    expected = _run(case.fn, inputs)
    with monkeypatch.context() as patch:
        _tiny_thresholds(patch)
        if case.fn(*inputs).requires_grad:
            mm.gradcheck(case.fn, *inputs)
        got = _run(case.fn, inputs)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12, atol=1e-14)
    for g, e in zip(got[1], expected[1]):
        np.testing.assert_allclose(g, e, rtol=1e-11, atol=1e-13)
