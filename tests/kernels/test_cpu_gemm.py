"""kernels/matmul.py, the CPU side: ``cpu_gemm`` through CBLAS by ctypes, and the ops that use it.

Every test runs on each CPU library this process can bind: NumPy's own OpenBLAS (always, the
route CI tests), MKL (skipped when it is not installed: ``pip install -e .[mkl]``) and no library
at all (``cpu_gemm``'s ``np.matmul`` fallback). References are float64 NumPy products.
"""

import os
import warnings

import numpy as np
import pytest

import minillm as mm
from minillm import backend
from minillm.kernels import matmul as kernels
from minillm.kernels.matmul import cpu_gemm
from minillm.ops import common


def _mkl_or_none():
    candidates = kernels._mkl_candidates()
    chosen = os.environ.get("MINILLM_BLAS", "")
    if "mkl_rt" in chosen:
        candidates.insert(0, chosen)
    for path in candidates:
        blas = kernels._mkl(path)
        if blas is not None:
            return blas
    return None


# (cpu_gemm_batched's one CBLAS call is MKL's only: NumPy's OpenBLAS 0.3.31 exports an unprefixed
# cblas_sgemm_batch_strided, no faster than np.matmul on attention's tiles, which crashed on a
# stack of 19 x 33 by 33 x 23 products; without MKL the batched products are np.matmul's.)
_LIBRARIES = {"openblas": kernels._numpy_openblas, "mkl": _mkl_or_none, "numpy": lambda: None}


@pytest.fixture(params=list(_LIBRARIES))
def blas(request, monkeypatch):
    """Route every ``cpu_gemm`` of the test through one library: the name of that library."""
    name = request.param
    library = _LIBRARIES[name]()
    if library is None and name != "numpy":
        pytest.skip(f"{name} is not available here" + (" (pip install -e .[mkl])" if name == "mkl" else ""))
    monkeypatch.setattr(kernels, "cpu_blas", lambda: library)
    return name


def _reference(a, b, trans_a=False, trans_b=False):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a.T if trans_a else a) @ (b.T if trans_b else b)


def _stored(rng, shape, dtype, layout):
    """A (rows, cols) array of ``dtype`` laid out as ``layout``: 'c' contiguous, 'f' a transposed
    view of a contiguous array, 'strided' rows a stride apart (a column slice of a wider array),
    'gapped' every other column (neither rows nor columns contiguous: cpu_gemm copies it)."""
    rows, cols = shape
    if layout == "c":
        return rng.standard_normal(shape).astype(dtype)
    if layout == "f":
        return rng.standard_normal((cols, rows)).astype(dtype).T
    if layout == "strided":
        return rng.standard_normal((rows, cols + 7)).astype(dtype)[:, 3:3 + cols]
    return rng.standard_normal((rows, 2 * cols)).astype(dtype)[:, ::2]


def _tolerance(dtype, k):
    return (2e-5, 2e-5 * np.sqrt(k)) if dtype == np.float32 else (1e-12, 1e-12 * np.sqrt(k))


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("layout_a, layout_b", [("c", "c"), ("f", "strided"), ("strided", "f"), ("gapped", "c")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_gemm_equals_the_float64_product(blas, trans_a, trans_b, layout_a, layout_b, dtype):
    rng = np.random.default_rng(0)
    m, k, n = 37, 53, 29                                   # all different: a swapped dimension shows
    a = _stored(rng, (k, m) if trans_a else (m, k), dtype, layout_a)
    b = _stored(rng, (n, k) if trans_b else (k, n), dtype, layout_b)
    a_before, b_before = a.copy(), b.copy()
    out = cpu_gemm(a, b, trans_a, trans_b)
    rtol, atol = _tolerance(dtype, k)
    assert out.shape == (m, n) and out.dtype == dtype
    np.testing.assert_allclose(out, _reference(a, b, trans_a, trans_b), rtol=rtol, atol=atol)
    np.testing.assert_array_equal(a, a_before)
    np.testing.assert_array_equal(b, b_before)


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_gemm_alpha_and_accumulate_into_strided_rows(blas, trans_a, trans_b, dtype):
    rng = np.random.default_rng(1)
    m, k, n = 24, 40, 18
    a = _stored(rng, (k, m) if trans_a else (m, k), dtype, "c")
    b = _stored(rng, (n, k) if trans_b else (k, n), dtype, "c")
    wide = rng.standard_normal((m, n + 10)).astype(dtype)      # out: columns 4 .. 4+n of it (ldc = n + 10)
    before = wide.copy()
    out = wide[:, 4:4 + n]
    result = cpu_gemm(a, b, trans_a, trans_b, out=out, alpha=-0.5, accumulate=True)
    assert result is out
    rtol, atol = _tolerance(dtype, k)
    expected = before[:, 4:4 + n] - 0.5 * _reference(a, b, trans_a, trans_b)
    np.testing.assert_allclose(wide[:, 4:4 + n], expected, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(wide[:, :4], before[:, :4])            # the columns around it untouched
    np.testing.assert_array_equal(wide[:, 4 + n:], before[:, 4 + n:])
    cpu_gemm(a, b, trans_a, trans_b, out=out, alpha=2.0)                  # beta = 0: the old content is gone
    np.testing.assert_allclose(out, 2.0 * _reference(a, b, trans_a, trans_b), rtol=rtol, atol=atol)


def test_cpu_gemm_single_rows_and_columns(blas):
    rng = np.random.default_rng(2)
    for m, k, n in [(1, 30, 20), (20, 30, 1), (20, 1, 30), (1, 1, 1)]:
        a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
        for x, y, ta, tb in [(a, b, False, False), (a.T.copy(), b, True, False), (a, b.T.copy(), False, True)]:
            np.testing.assert_allclose(cpu_gemm(x, y, ta, tb), _reference(a, b), rtol=2e-5, atol=1e-4)


def test_cpu_gemm_empty_and_k_zero(blas):
    out = np.full((3, 4), 7.0, dtype=np.float32)
    cpu_gemm(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32), out=out, accumulate=True)
    np.testing.assert_array_equal(out, 7.0)                               # nothing added
    cpu_gemm(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32), out=out)
    np.testing.assert_array_equal(out, 0.0)                               # an empty sum is 0
    assert cpu_gemm(np.ones((0, 5)), np.ones((5, 4))).shape == (0, 4)
    assert cpu_gemm(np.ones((3, 5)), np.ones((5, 0))).shape == (3, 0)


def test_cpu_gemm_out_overlapping_an_operand(blas):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((16, 16)), rng.standard_normal((16, 16))
    expected = a @ b
    cpu_gemm(a, b, out=a)                                                  # read before it is written
    np.testing.assert_allclose(a, expected, rtol=1e-12, atol=1e-12)


def test_cpu_gemm_refuses_bad_operands_clearly():
    f32, f64 = np.ones((3, 4), np.float32), np.ones((4, 5), np.float64)
    with pytest.raises(TypeError, match="different dtypes"):
        cpu_gemm(f32, f64)
    with pytest.raises(TypeError, match="unsupported dtype int64"):
        cpu_gemm(np.ones((3, 4), np.int64), np.ones((4, 5), np.int64))
    with pytest.raises(TypeError, match="unsupported dtype float16"):
        cpu_gemm(np.ones((3, 4), np.float16), np.ones((4, 5), np.float16))
    with pytest.raises(TypeError, match="NumPy arrays"):
        cpu_gemm([[1.0]], [[1.0]])
    with pytest.raises(ValueError, match="2-D"):
        cpu_gemm(np.ones((2, 3, 4)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        cpu_gemm(np.ones((3, 4)), np.ones((5, 4)))                        # needs trans_b
    with pytest.raises(ValueError, match="out has shape"):
        cpu_gemm(np.ones((3, 4)), np.ones((4, 5)), out=np.empty((5, 3)))
    with pytest.raises(TypeError, match="out must be"):
        cpu_gemm(np.ones((3, 4)), np.ones((4, 5)), out=np.empty((3, 5), np.float32))
    with pytest.raises(ValueError, match="accumulate needs out"):
        cpu_gemm(np.ones((3, 4)), np.ones((4, 5)), accumulate=True)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_gemm(np.ones((3, 4)), np.ones((4, 5)), out=np.empty((5, 3)).T)


def _stack(rng, n, shape, dtype, layout):
    """n matrices of ``shape``: 'c' contiguous, 'f' transposed views, 'broadcast' one matrix
    repeated with batch stride 0, 'strided' rows a stride apart."""
    rows, cols = shape
    if layout == "c":
        return rng.standard_normal((n, rows, cols)).astype(dtype)
    if layout == "f":
        return rng.standard_normal((n, cols, rows)).astype(dtype).swapaxes(1, 2)
    if layout == "broadcast":
        return np.broadcast_to(rng.standard_normal((rows, cols)).astype(dtype), (n, rows, cols))
    return rng.standard_normal((n, rows, cols + 5)).astype(dtype)[:, :, 2:2 + cols]


@pytest.mark.parametrize("layout_a, layout_b", [("c", "c"), ("f", "c"), ("c", "f"), ("f", "f"),
                                                ("strided", "broadcast"), ("broadcast", "strided")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_gemm_batched_equals_the_float64_products(blas, layout_a, layout_b, dtype):
    rng = np.random.default_rng(6)
    n, m, k, p = 5, 19, 33, 23
    a, b = _stack(rng, n, (m, k), dtype, layout_a), _stack(rng, n, (k, p), dtype, layout_b)
    expected = np.matmul(a.astype(np.float64), b.astype(np.float64))
    rtol, atol = _tolerance(dtype, k)
    wide = rng.standard_normal((n, m, p + 9)).astype(dtype)                # out: rows p + 9 apart
    before = wide.copy()
    out = wide[:, :, 4:4 + p]
    assert kernels.cpu_gemm_batched(a, b, out) is out
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=atol)
    kernels.cpu_gemm_batched(a, b, out, accumulate=True)                   # beta = 1
    np.testing.assert_allclose(out, 2 * expected, rtol=rtol, atol=2 * atol)
    np.testing.assert_array_equal(wide[:, :, :4], before[:, :, :4])
    np.testing.assert_array_equal(wide[:, :, 4 + p:], before[:, :, 4 + p:])


def test_cpu_gemm_batched_interleaved_output_empty_and_k_zero(blas):
    """Matrices of ``out`` interleaved (attention's heads-last O: rows H·D apart, heads D apart):
    the batched call refuses that layout, so it must fall back, and still be right."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((3, 16, 24), dtype=np.float32), rng.standard_normal((3, 24, 8), dtype=np.float32)
    memory = np.zeros((16, 3, 8), dtype=np.float32)                        # (T, H, D)
    kernels.cpu_gemm_batched(a, b, memory.transpose(1, 0, 2))              # written as (H, T, D)
    np.testing.assert_allclose(memory.transpose(1, 0, 2), _reference_stack(a, b), rtol=2e-5, atol=1e-4)
    out = np.full((3, 16, 8), 5.0, dtype=np.float32)
    kernels.cpu_gemm_batched(a[:, :, :0], b[:, :0], out, accumulate=True)
    np.testing.assert_array_equal(out, 5.0)
    kernels.cpu_gemm_batched(a[:, :, :0], b[:, :0], out)
    np.testing.assert_array_equal(out, 0.0)
    assert kernels.cpu_gemm_batched(a[:0], b[:0], np.empty((0, 16, 8), np.float32)).shape == (0, 16, 8)


def _reference_stack(a, b):
    return np.matmul(a.astype(np.float64), b.astype(np.float64))


# ------------------------------------------------------------- the ops that call it


@pytest.mark.parametrize("m, k, n", [(600, 300, 500), (64, 512, 4096), (7, 5, 3)])   # rows, columns, one call
def test_cpu_matmul_and_pair_equal_numpy(blas, m, k, n):
    rng = np.random.default_rng(4)
    a, w, bias = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (n, k), (n,)))
    np.testing.assert_allclose(common.cpu_matmul(a, w.T, bias), _reference(a, w.T) + bias,
                               rtol=2e-5, atol=2e-5 * np.sqrt(k))
    np.testing.assert_allclose(common.cpu_matmul(a.T.copy().T, w.T), _reference(a, w.T), rtol=2e-5, atol=2e-5 * np.sqrt(k))
    g = rng.standard_normal((m, n), dtype=np.float32)
    dx, dw, db = common.cpu_matmul_pair((g, w), (g.T, a), g)              # a linear layer's backward
    np.testing.assert_allclose(dx, _reference(g, w), rtol=2e-5, atol=2e-5 * np.sqrt(n))
    np.testing.assert_allclose(dw, _reference(g.T, a), rtol=2e-5, atol=2e-5 * np.sqrt(m))
    np.testing.assert_allclose(db, g.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-4)


def test_linear_and_matmul_ops_equal_numpy(blas):
    """The Linear and MatMul ops, forward and backward, with products above the threading
    threshold, against the NumPy formulas."""
    rng = np.random.default_rng(5)
    x = mm.Tensor(rng.standard_normal((4, 128, 96), dtype=np.float32), requires_grad=True)
    w = mm.Tensor(rng.standard_normal((1536, 96), dtype=np.float32), requires_grad=True)
    b = mm.Tensor(rng.standard_normal(1536, dtype=np.float32), requires_grad=True)
    g = rng.standard_normal((4, 128, 1536), dtype=np.float32)
    y = mm.functional.linear(x, w, b)
    y.backward(g)
    x2, g2 = x.data.reshape(-1, 96).astype(np.float64), g.reshape(-1, 1536).astype(np.float64)
    tol = dict(rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(y.data.reshape(-1, 1536), x2 @ w.data.T.astype(np.float64) + b.data, **tol)
    np.testing.assert_allclose(x.grad.reshape(-1, 96), g2 @ w.data.astype(np.float64), **tol)
    np.testing.assert_allclose(w.grad, g2.T @ x2, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(b.grad, g2.sum(axis=0), rtol=1e-4, atol=1e-3)

    p = mm.Tensor(rng.standard_normal((512, 300)), requires_grad=True)   # float64: the dgemm route
    q = mm.Tensor(rng.standard_normal((300, 700)), requires_grad=True)
    dz = rng.standard_normal((512, 700))
    z = p @ q
    z.backward(dz)
    np.testing.assert_allclose(z.data, p.data @ q.data, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(p.grad, dz @ q.data.T, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(q.grad, p.data.T @ dz, rtol=1e-12, atol=1e-10)


def test_products_are_split_whenever_each_piece_runs_on_one_core(blas, monkeypatch):
    """With MKL (sequential) a large product is shared out between minillm's threads even when
    NumPy's OpenBLAS threads cannot be held at one; with OpenBLAS it then is not (its own threads
    would run inside each piece)."""
    if common.CPU_THREADS < 2:
        pytest.skip("needs 2+ CPU threads")
    monkeypatch.setattr(backend, "can_limit_blas_threads", lambda: False)
    splits = []
    real = common.run_parallel
    monkeypatch.setattr(common, "run_parallel", lambda work, pieces: splits.append(len(pieces)) or real(work, pieces))
    a, b = np.ones((2048, 384), np.float32), np.ones((384, 1152), np.float32)
    np.testing.assert_array_equal(common.cpu_matmul(a, b), 384.0)
    assert (splits == [common.CPU_THREADS]) == (blas == "mkl"), splits


@pytest.mark.parametrize("training", [True, False])
def test_unsplit_products_run_on_mkl_when_training(blas, training, monkeypatch):
    """One CPU thread, or a product too small to split: when training (the BLAS single-threaded)
    with MKL still one ``cpu_gemm`` (the bias added as in the blocks); otherwise (generation,
    OpenBLAS's threads) NumPy's ``@`` as before. Same values either way."""
    calls = []
    real = common.cpu_gemm
    monkeypatch.setattr(common, "cpu_gemm", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    monkeypatch.setattr(common, "CPU_THREADS", 1)
    monkeypatch.setattr(backend, "cpu_threads_tuned", lambda: training)
    rng = np.random.default_rng(9)
    a, w, bias = (rng.standard_normal(s, dtype=np.float32) for s in ((300, 200), (100, 200), (100,)))
    np.testing.assert_allclose(common.cpu_matmul(a, w.T, bias), _reference(a, w.T) + bias, rtol=2e-5, atol=1e-4)
    np.testing.assert_array_equal(common.cpu_matmul(np.ones((4, 3), np.int64), np.ones((3, 2), np.int64)), 3)
    assert len(calls) == (1 if blas == "mkl" and training else 0)


def test_the_library_is_chosen_by_minillm_blas(monkeypatch):
    """``MINILLM_BLAS``: 'numpy' binds nothing, 'openblas' NumPy's own, a path that holds no CBLAS
    warns and falls back to the default search; the name says which."""
    monkeypatch.setattr(kernels, "cpu_blas", kernels.find_cpu_blas)   # looked up afresh each call
    monkeypatch.setenv("MINILLM_BLAS", "numpy")
    assert kernels.cpu_blas() is None and kernels.cpu_blas_name() == "NumPy matmul"
    assert not kernels.cpu_blas_single_threaded()
    monkeypatch.setenv("MINILLM_BLAS", "openblas")
    if backend.numpy_openblas() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can reach")
    assert kernels.cpu_blas_name().startswith("OpenBLAS") and not kernels.cpu_blas_single_threaded()
    monkeypatch.setenv("MINILLM_BLAS", "/nonexistent/libcblas.so")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = kernels.cpu_blas()
    assert default is not None and any("MINILLM_BLAS" in str(w.message) for w in caught)
    assert default.name.startswith(("MKL", "OpenBLAS"))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])                            # plain and grouped-query
def test_attention_through_each_library_equals_the_composed_op(blas, causal, kv_heads):
    """Fused attention's tile products (``_grouped_matmul``, ``_group_summed_matmul``: batched
    calls; dK, dV of later tiles added in by the BLAS) against the op composed from matmul and
    softmax, float64, T = 150: two row tiles, the second seeing more keys than the first."""
    rng = np.random.default_rng(8)
    shapes = [(2, 4, 150, 8), (2, kv_heads, 150, 8), (2, kv_heads, 150, 8)]
    fused = [mm.Tensor(rng.standard_normal(s), requires_grad=True) for s in shapes]
    composed = [mm.Tensor(x.data.copy(), requires_grad=True) for x in fused]
    g = rng.standard_normal((2, 4, 150, 8))
    y = mm.functional.scaled_dot_product_attention(*fused, causal=causal)
    y.backward(g)
    z = attention_composed(*composed, causal=causal)
    z.backward(g)
    np.testing.assert_allclose(y.data, z.data, rtol=1e-10, atol=1e-12)
    for x, x_ref in zip(fused, composed):
        np.testing.assert_allclose(x.grad, x_ref.grad, rtol=1e-9, atol=1e-11)


def attention_composed(q, k, v, causal):
    from minillm.ops.attention import scaled_dot_product_attention_composed   # noqa: PLC0415

    return scaled_dot_product_attention_composed(q, k, v, causal=causal)


def test_mkl_is_the_default_unless_this_process_loaded_it_already(monkeypatch):
    """With MKL installed the default search binds it; an MKL already in the process (a NumPy
    built against it, say) is left alone (its threading layer stays as its user set it)."""
    monkeypatch.setattr(kernels, "cpu_blas", kernels.find_cpu_blas)
    monkeypatch.delenv("MINILLM_BLAS", raising=False)
    monkeypatch.setattr(kernels, "_mapped", lambda fragment: True)
    chosen = kernels.cpu_blas()
    assert chosen is None or not chosen.name.startswith("MKL")
    if _mkl_or_none() is None:
        pytest.skip("mkl is not available here (pip install -e .[mkl])")
    monkeypatch.setattr(kernels, "_mapped", lambda fragment: False)
    assert kernels.cpu_blas().name.startswith("MKL") and kernels.cpu_blas_single_threaded()


def test_the_library_is_looked_up_once_even_from_threads_at_once(monkeypatch):
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    lookups = []

    def slow_lookup():
        lookups.append(1)
        time.sleep(0.05)                                   # the others arrive while this one runs
        return None

    monkeypatch.setattr(kernels, "_cpu_blas_found", [])
    monkeypatch.setattr(kernels, "find_cpu_blas", slow_lookup)
    threads = [threading.Thread(target=kernels.cpu_blas) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert lookups == [1] and kernels.cpu_blas() is None
