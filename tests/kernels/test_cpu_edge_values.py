"""Unusual values through the compiled CPU loops (minillm/kernels/cpu.py: GELU, layer norm, RMS norm,
AdamW, attention's softmax rows) against the NumPy passes that run without them (the same op under
``cpu.use_cpu_kernels(False)``) and against float64 formulas: ±inf, NaN, values near float32's
largest, subnormals, rows of one value (variance 0) or of one element, negative zero, gradients
with inf/NaN, AdamW with lr 0, weight decay 0 or a tiny eps, causal attention rows that see one
key, T = 1, scores of ±inf/NaN. Both paths must give NaN at the same places, the same infinities
(with their signs) and the same finite values up to rounding.

Where both paths agree on an arguably odd value, the test pins the agreement and says so (e.g.
gelu(-inf) is NaN on both: -inf · 0 in x Φ(x))."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import minillm as mm
from minillm import functional as F, optim
from minillm.kernels import cpu

pytestmark = [pytest.mark.skipif(not cpu.enabled(), reason="no C++ compiler here for the CPU kernels"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]   # NumPy's overflow/invalid warnings

INF, NAN = np.inf, np.nan
F32_BIG = 3e38                       # near float32's largest (3.4e38)


def assert_same_values(got, expected, rtol, atol=0.0, what=""):
    """NaN exactly where ``expected`` has NaN, the same infinities (sign included), finite values
    within rtol |expected| + atol."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=f"{what}: NaN where")
    np.testing.assert_array_equal(np.where(np.isinf(got), got, 0), np.where(np.isinf(expected), expected, 0),
                                  err_msg=f"{what}: infinities")
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=rtol, atol=atol, err_msg=f"{what}: values")


def forward_backward(fn, arrays, grad=None):
    """[y, dL/d(each input)] of ``fn`` on float tensors made from ``arrays``, dL/dy = ``grad`` (ones)."""
    tensors = [mm.Tensor(np.array(a), requires_grad=True) for a in arrays]
    y = fn(*tensors)
    y.backward(mm.Tensor(np.ones_like(y.data) if grad is None else np.array(grad)))
    return [np.array(y.data)] + [np.array(mm.backend.to_numpy(t.grad.data if isinstance(t.grad, mm.Tensor)
                                                               else t.grad)) for t in tensors]


def both_paths(run):
    """``run()`` with the compiled loops, then with the NumPy passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with cpu.use_cpu_kernels(True):
            compiled = run()
        with cpu.use_cpu_kernels(False):
            numpy = run()
    return compiled, numpy


def assert_paths_agree(compiled, numpy, rtol, atol=0.0, names=(), scale_atol=0.0):
    """Each pair as ``assert_same_values``; ``scale_atol``: plus that times the largest finite
    |value| of the output (for values that are differences of larger terms, e.g. a norm's dx)."""
    for i, (a, b) in enumerate(zip(compiled, numpy)):
        b64 = np.asarray(b, dtype=np.float64)
        largest = float(np.abs(b64[np.isfinite(b64)]).max(initial=0.0))
        assert_same_values(a, b, rtol, atol + scale_atol * largest,
                           what=f"compiled vs NumPy: {names[i] if i < len(names) else i}")


RTOL = {np.float32: 2e-5, np.float64: 1e-12}



# ------------------------------------------------------------------ GELU

EDGE = [INF, -INF, NAN, 1e30, -1e30, F32_BIG, -F32_BIG, 1e20, -1e20, 1e-40, -1e-40, 0.0, -0.0,
        30.0, -30.0, 5.0, -5.0, 0.5, -0.5, 1e-20]


def gelu_reference(x, approximate):
    """GELU and its derivative in float64, for moderate x: x Φ(x) or GPT-2's tanh form."""
    x = np.asarray(x, dtype=np.float64)
    if approximate == "tanh":
        k, c = math.sqrt(2 / math.pi), 0.044715
        t = np.tanh(k * (x + c * x ** 3))
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * c * x * x)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return x * cdf, cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_edge_values(approximate, dtype):
    x = np.array(EDGE, dtype=dtype)
    grads = [None, np.where(np.arange(x.size) % 3 == 0, INF, 1.0).astype(dtype),
             np.where(np.arange(x.size) % 4 == 1, NAN, -2.0).astype(dtype)]
    for grad in grads:
        compiled, numpy = both_paths(lambda: forward_backward(lambda t: F.gelu(t, approximate=approximate), [x], grad))
        assert_paths_agree(compiled, numpy, RTOL[dtype], 1e-30, names=("y", "dx"))
    y, dx = compiled if grads[-1] is None else both_paths(
        lambda: forward_backward(lambda t: F.gelu(t, approximate=approximate), [x]))[0]
    moderate = np.isfinite(x) & (np.abs(x) <= 30)
    y_ref, dx_ref = gelu_reference(x[moderate], approximate)
    unit = np.finfo(dtype).eps                       # y = x (1 + t) / 2 cancels for x < 0: error ~ unit |x|
    np.testing.assert_allclose(y[moderate], y_ref, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=8 * unit * np.abs(x[moderate]).max())
    np.testing.assert_allclose(dx[moderate], dx_ref, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=64 * unit)
    by_value = dict(zip(EDGE, zip(y, dx)))
    assert by_value[INF][0] == INF and np.isnan(by_value[NAN]).all()
    assert by_value[1e30][0] == 1e30 and by_value[-1e30][0] == 0
    if approximate == "tanh" and dtype == np.float32:
        # odd, but the same on both paths: x² overflows (|x| > 1.8e19), (1 - t²) · x · x² = 0 · inf
        assert np.isnan(by_value[1e30][1]) and np.isnan(by_value[1e20][1])
    else:
        assert by_value[1e30][1] == 1 and by_value[-1e30][1] == 0
    # odd, but the same on both paths (and on a GPU, the same body): gelu(-inf) = -inf · Φ(-inf) = -inf · 0
    assert np.isnan(by_value[-INF][0])


# ------------------------------------------------------------------ layer norm and RMS norm


def layer_norm_reference(x, w, b, eps):
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def rms_norm_reference(x, w, eps):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def norm_both_paths(x, w, b, grad, eps):
    """((LN compiled, LN NumPy), (RMS compiled, RMS NumPy)): [y, dx, dw(, db)] each."""
    layer = both_paths(lambda: forward_backward(lambda t, tw, tb: F.layer_norm(t, tw, tb, eps=eps), [x, w, b], grad))
    rms = both_paths(lambda: forward_backward(lambda t, tw: F.rms_norm(t, tw, eps=eps), [x, w], grad))
    return layer, rms


EDGE_ROWS = {                         # rows of 5; each test row is alone in its (2, 5) input, with a plain row
    "inf": [1.0, INF, 2.0, 3.0, -1.0], "-inf": [1.0, -INF, 2.0, 3.0, -1.0], "nan": [1.0, NAN, 2.0, 3.0, -1.0],
    "inf and -inf": [INF, -INF, 0.0, 1.0, 2.0], "huge": [1e30, -1e30, 2e30, 0.0, 5e29],
    "subnormal": [1e-40, -1e-40, 2e-40, 0.0, 3e-40], "all equal": [0.1] * 5, "all equal, large": [7.3e3] * 5,
    "negative zeros": [-0.0, 0.0, -0.0, -0.0, 0.0], "zeros": [0.0] * 5,
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("row", list(EDGE_ROWS))
def test_norms_on_edge_rows(row, dtype):
    x = np.array([EDGE_ROWS[row], [0.5, -1.0, 2.0, 0.0, 1.5]], dtype=dtype)
    w, b = np.linspace(0.5, 1.5, 5).astype(dtype), np.linspace(-1, 1, 5).astype(dtype)
    for eps in (1e-5, 0.0):
        for grad in (None, np.where(np.arange(10).reshape(2, 5) % 3 == 0, INF, 1.0).astype(dtype),
                     np.where(np.arange(10).reshape(2, 5) % 4 == 1, NAN, -1.0).astype(dtype),
                     np.full((2, 5), F32_BIG if dtype == np.float32 else 1e300, dtype=dtype)):   # g w overflows
            if grad is not None and grad[0, 0] > 1 and row.startswith("all equal"):
                continue  # x̂ = x - μ is 0 or ±1 ulp as the sum rounds (its order is free): inf · 0 or ±inf

            (layer_c, layer_n), (rms_c, rms_n) = norm_both_paths(x, w, b, grad, eps)
            # dx takes differences of terms of size r |g w|: its rounding is relative to the largest
            tol = 1e-4 if dtype == np.float32 else 1e-10
            assert_paths_agree(layer_c, layer_n, tol, 1e-30, names=("y", "dx", "dw", "db"), scale_atol=tol)
            assert_paths_agree(rms_c, rms_n, tol, 1e-30, names=("y", "dx", "dw"), scale_atol=tol)
            if grad is None and eps:
                tol = 1e-5 if dtype == np.float32 else 1e-12
                # against float64 formulas; a row of one value gives (x - μ) / √eps · w + b = b
                x_ref = x.astype(np.float64)
                spread = np.abs(x_ref[np.isfinite(x_ref)]).max(initial=0.0) / math.sqrt(eps)
                assert_same_values(layer_c[0], layer_norm_reference(x, w, b, eps), tol,
                                   tol * max(1.0, spread) * (10 if dtype == np.float32 else 1), "layer norm y")
                with np.errstate(over="ignore"):     # mean(x²) overflows x's dtype (1e30 in float32): r = 0,
                    fits = np.isfinite((x * x).mean(-1))  # y = 0 on both paths; the float64 formula is finite
                assert_same_values(rms_c[0][fits], rms_norm_reference(x, w, eps)[fits], tol, tol, "RMS norm y")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_norms_on_rows_of_one_element(dtype):
    """n = 1: x̂ = 0 (layer norm: y = b, dx = 0, dw = 0) whatever x, but NaN/inf x give NaN; RMS
    norm: y = x/√(x² + eps) w."""
    x = np.array([[1.5], [-0.0], [INF], [-INF], [NAN], [1e-40], [1e30]], dtype=dtype)
    w, b = np.array([0.75], dtype=dtype), np.array([-0.25], dtype=dtype)
    for grad in (None, np.array([[1.0], [INF], [2.0], [NAN], [1.0], [-INF], [3.0]], dtype=dtype)):
        (layer_c, layer_n), (rms_c, rms_n) = norm_both_paths(x, w, b, grad, 1e-5)
        assert_paths_agree(layer_c, layer_n, RTOL[dtype], 1e-6, names=("y", "dx", "dw", "db"))
        # RMS dx = r³ eps g w: the difference of two terms of size r g w (the rounding left of them)
        assert_paths_agree(rms_c, rms_n, 1e-4 if dtype == np.float32 else 1e-9, 1e-6, names=("y", "dx", "dw"))
    y = layer_c[0]
    np.testing.assert_array_equal(np.isnan(y[:, 0]), ~np.isfinite(x[:, 0]))
    assert (y[np.isfinite(x[:, 0]), 0] == np.float64(b[0])).all()
    fits = np.isfinite(x[:, 0].astype(np.float64) ** 2) & (np.abs(x[:, 0]) < np.sqrt(np.finfo(dtype).max))
    # x = 1e30 in float32: x² overflows, r = 0, y = 0 on both paths (the float64 formula: w)
    assert_same_values(rms_c[0][fits], rms_norm_reference(x, w, 1e-5)[fits], 1e-5, 0.0, "RMS norm y")
    assert (rms_c[0][~fits & np.isfinite(x[:, 0])] == 0).all()


@pytest.mark.parametrize("dtype, big", [(np.float32, F32_BIG), (np.float64, 1.5e308)])
def test_norms_compute_products_in_the_written_order(dtype, big):
    """Rows whose squares overflow (σ² = inf, r = 0) with large weights: x̂ = (x - μ) r is 0, so
    y = b. The compiled loop once computed (x - μ) w r, and (x - μ) w overflowed: inf · 0 = NaN.
    (Both paths give b where a float64 formula gives ±w + b: an overflow of σ² in x's dtype.)"""
    x = np.array([[1.0, 2.0, -big, big], [big] * 4], dtype=dtype)
    x[1] = [big, -0.5 * big, 0.25 * big, big]       # RMS only: mean(x²) overflows, Σ x does not matter
    w, b = np.array([0.5, 1.0, 1.2, 1.5], dtype=dtype), np.linspace(-1, 1, 4).astype(dtype)
    (layer_c, layer_n), (rms_c, rms_n) = norm_both_paths(x, w, b, None, 1e-5)
    np.testing.assert_array_equal(layer_c[0][0], b)                    # σ² = inf: x̂ = 0, y = b
    np.testing.assert_array_equal(rms_c[0], np.zeros_like(x))          # mean(x²) = inf: y = 0
    assert_same_values(layer_c[0][0], layer_n[0][0], 0.0, what="layer norm y")
    assert_same_values(rms_c[0], rms_n[0], 0.0, what="RMS norm y")
    assert_paths_agree(rms_c[1:], rms_n[1:], RTOL[dtype], 1e-6, names=("dx", "dw"))
    (layer_c, layer_n), _ = norm_both_paths(x[:1], w, b, np.full((1, 4), 2.0, dtype=dtype), 1e-5)
    assert_paths_agree(layer_c, layer_n, RTOL[dtype], 1e-6, names=("y", "dx", "dw", "db"))



@pytest.mark.parametrize("dtype, x_row, g, eps", [
    (np.float32, [0.0, 1e-4, 2e-4, 3e-4, -1e-4], 5e37, 1e-5),      # r ≈ 300 (Σ g w still finite)
    (np.float64, [1e-40, -1e-40, 2e-40, 0.0, 3e-40], 1e300, 0.0)])  # r ≈ 1e40
def test_norm_gradients_overflow_with_the_right_signs(dtype, x_row, g, eps):
    """dx = r (g w - x̂ mean(g w x̂) - mean(g w)) overflows here (r |g w| > the largest float), so it
    is ±inf with the sign of g w - x̂ mean(g w x̂) - mean(g w), which is finite. Regrouped as
    (x - μ)(r mean(g w x̂)), the product overflowed first and gave every element the sign of x - μ
    (and NaN at x = μ): the compiled loops must keep x̂ = (x - μ) r, as the NumPy passes do."""
    x = np.array([x_row], dtype=dtype)
    w, b = np.linspace(0.5, 1.5, 5).astype(dtype), np.zeros(5, dtype=dtype)
    grad = np.full((1, 5), g, dtype=dtype)
    (layer_c, layer_n), (rms_c, rms_n) = norm_both_paths(x, w, b, grad, eps)
    x64, w64 = x.astype(np.float64)[0], w.astype(np.float64)
    for (compiled, numpy), centred in (((layer_c, layer_n), True), ((rms_c, rms_n), False)):
        d = x64 - x64.mean() if centred else x64
        x_hat = d / np.sqrt((d * d).mean() + eps)
        inner = w64 - x_hat * (w64 * x_hat).mean() - (w64.mean() if centred else 0.0)   # dx / (r g)
        big = np.abs(inner) > 0.01      # (where w = mean(w), dx is rounding noise of the overflowing terms)
        assert np.isinf(numpy[1][0, big]).all()
        np.testing.assert_array_equal(np.sign(compiled[1][0, big]), np.sign(inner[big]))
        np.testing.assert_array_equal(np.sign(numpy[1][0, big]), np.sign(inner[big]))


# ------------------------------------------------------------------ AdamW


def adamw_reference(p, grads, lr, betas, eps, weight_decay, dtype):
    """p, m, v after AdamW steps t = 1, 2, ... in float64, as PyTorch writes it, and where v stayed
    within ``dtype``'s normal range at every step (elsewhere v overflowed to inf or lost its digits
    in ``dtype``: p differs from float64 there, on both paths)."""
    beta1, beta2 = betas
    p = np.array(p, dtype=np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    fits = np.ones(p.shape, dtype=bool)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, dtype=np.float64)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
        fits &= (v == 0) | ((v >= np.finfo(dtype).tiny) & (v <= np.finfo(dtype).max))
    return p, m, v, fits


def adamw_steps(p0, grads, **hyper):
    p = mm.Tensor(np.array(p0), requires_grad=True)
    opt = optim.AdamW([p], **hyper)
    for g in grads:
        p.grad = np.array(g)
        opt.step()
    state = opt.state[id(p)]
    return [np.array(p.data), np.array(state["exp_avg"]), np.array(state["exp_avg_sq"])]


GRADS = [INF, -INF, NAN, 1e30, -1e30, F32_BIG, 1e20, -1e20, 1e19, 1e-40, -1e-40, 0.0, -0.0, 1.0, -1.0, 1e-20, 0.5, 2.0]
PARAMS = [1.0, -2.0, 0.5, INF, -INF, NAN, F32_BIG, -0.0, 1e-40, 0.0, 3.0, -1.0, 1e30, 0.25, 2.0, -0.5, 1.5, -3.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hyper", [dict(), dict(lr=0.0), dict(weight_decay=0.0), dict(lr=0.0, weight_decay=0.0),
                                   dict(eps=1e-40), dict(eps=0.0), dict(betas=(0.0, 0.0)),
                                   dict(lr=10.0, weight_decay=0.5, betas=(0.5, 0.9))],
                         ids=["default", "lr 0", "wd 0", "lr 0 wd 0", "eps 1e-40", "eps 0", "betas 0", "large lr"])
def test_adamw_edge_gradients(hyper, dtype):
    """p, m, v after two steps (the edge gradients first, then again shifted by 3 places): the
    compiled loop against the NumPy passes, and finite or infinite entries against float64."""
    g1 = np.array(GRADS, dtype=dtype)
    grads = [g1, np.roll(g1, 3)]
    p0 = np.array(PARAMS, dtype=dtype)
    compiled, numpy = both_paths(lambda: adamw_steps(p0, grads, **hyper))
    # (1 - beta2) taken in the parameters' dtype by the loop, in double by NumPy: 1.3e-5 apart in float32
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    assert_paths_agree(compiled, numpy, rtol, 1e-30, names=("p", "m", "v"))
    with np.errstate(all="ignore"):
        *expected, fits = adamw_reference(p0, grads, **{
            **dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), **hyper}, dtype=dtype)
        for got, want, name in zip(compiled, expected, ("p", "m", "v")):
            want = want.astype(dtype)                # float64 values that overflow the dtype are its inf
            where = ~np.isnan(want) & (fits if name in ("p", "v") else True)
            assert_same_values(got[where], want[where], rtol, 1e-30, what=f"{name} vs float64")


# ------------------------------------------------------------------ attention's softmax rows


def attention_reference(q, k, v, causal):
    """float64 attention with the masked scores replaced by -inf (never read)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scores = np.einsum("...id,...jd->...ij", q, k) / math.sqrt(q.shape[-1])
    if causal:
        tq, tk = scores.shape[-2:]
        scores = np.where(np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq), -INF, scores)
    with np.errstate(all="ignore"):
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
    return np.einsum("...ij,...jd->...id", weights, v)


ATTENTION_CASES = {                  # (tensor, head, position, feature, value): one entry of q, k or v set
    "plain": None, "q inf": ("q", 0, 1, 0, INF), "q -inf": ("q", 0, 1, 0, -INF), "q nan": ("q", 0, 2, 1, NAN),
    "k inf": ("k", 0, 0, 0, INF), "k nan (a future key)": ("k", 0, 3, 2, NAN),
    "k -inf (the last key)": ("k", 1, 4, 0, -INF), "q huge": ("q", 1, 1, 0, 1e30), "k huge": ("k", 0, 2, 0, F32_BIG),
    "q subnormal": ("q", 0, 1, 0, 1e-40),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_edge_scores(case, causal, dtype):
    """Two heads of T = 5 (causal: query 0 sees only key 0). A NaN or inf in q or k makes NaN the
    rows whose visible scores it reaches, and only them: a key in a query's future is never read
    (the NumPy passes once added the mask, -inf + NaN = NaN, and spread it to every row). The
    gradients, also with inf/NaN entries of dL/dO, agree between the two paths."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
    if ATTENTION_CASES[case] is not None:
        name, head, position, feature, value = ATTENTION_CASES[case]
        {"q": q, "k": k, "v": v}[name][0, head, position, feature] = value
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    grads = [None, np.where(rng.random((1, 2, 5, 4)) < 0.1, INF, 1.0).astype(dtype)]
    grads.append(np.where(np.arange(40).reshape(1, 2, 5, 4) == 9, NAN, 1.0).astype(dtype))
    for grad in grads:
        compiled, numpy = both_paths(lambda: forward_backward(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, causal=causal), [q, k, v], grad))
        assert_paths_agree(compiled, numpy, 1e-4 if dtype == np.float32 else 1e-10, 1e-5,
                           names=("out", "dq", "dk", "dv"))
    expected = attention_reference(q, k, v, causal)
    assert_same_values(compiled[0], expected, 1e-4 if dtype == np.float32 else 1e-10, 1e-6, "out vs float64")
    if causal:                                        # query 0 sees key 0 alone: its output is v[key 0]
        first = np.isfinite(q[..., 0, :]).all(-1) & np.isfinite(k[..., 0, :]).all(-1)
        np.testing.assert_array_equal(compiled[0][..., 0, :][first], v[..., 0, :][first])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_of_one_position(causal, dtype):
    """T = 1: out = v whatever the score (finite, huge or ±inf through q), NaN for a NaN score."""
    q = np.array([[[[1.0, 2.0]], [[1e30, 0.0]], [[INF, 1.0]], [[-INF, 1.0]], [[NAN, 0.0]]]], dtype=dtype)
    k = np.full((1, 5, 1, 2), 0.5, dtype=dtype)
    v = np.arange(10, dtype=dtype).reshape(1, 5, 1, 2)
    compiled, numpy = both_paths(lambda: forward_backward(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, causal=causal), [q, k, v]))
    assert_paths_agree(compiled, numpy, RTOL[dtype], 1e-6, names=("out", "dq", "dk", "dv"))
    np.testing.assert_array_equal(compiled[0][0, :2], v[0, :2])          # exp(s - s) = 1
    # a score of ±inf: exp(inf - inf) = NaN on both paths (a float64 formula too); NaN: NaN
    assert np.isnan(compiled[0][0, 2:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("position", [0, 5, 15, 16, 17, 31, 32, 36])
def test_attention_long_rows_with_one_nan_or_inf_key(position, dtype):
    """Rows of 37 keys: the row maximum's vector part (two vectors of maxima) and its tail. A NaN
    or +inf key makes NaN the rows that see it (the maximum may pass over a NaN: its exp makes the
    row NaN anyway), a huge finite one takes the whole weight."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 1, 37, 4)).astype(dtype) for _ in range(3))
    for value in (NAN, INF, 1e30):
        k_edge = k.copy()
        k_edge[0, 0, position] = value
        for causal in (True, False):
            compiled, numpy = both_paths(lambda: forward_backward(
                lambda a, b, c: F.scaled_dot_product_attention(a, b, c, causal=causal), [q, k_edge, v]))
            assert_paths_agree(compiled, numpy, 1e-4 if dtype == np.float32 else 1e-10, 1e-5,
                               names=("out", "dq", "dk", "dv"))
            assert_same_values(compiled[0], attention_reference(q, k_edge, v, causal),
                               1e-4 if dtype == np.float32 else 1e-10, 1e-6, f"out vs float64 (key {value})")
