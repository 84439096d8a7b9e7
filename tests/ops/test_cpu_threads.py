"""The CPU's own threading (ops/common.py): products shared out in blocks, BLAS single-threaded inside."""

import numpy as np
import pytest

import minillm as mm
from minillm import optim
from minillm import backend
from minillm.ops import common
from minillm.ops.common import cpu_matmul, cpu_matmul_pair, run_parallel

needs_threads = pytest.mark.skipif(common.CPU_THREADS < 2 or not backend.can_limit_blas_threads(),
                                   reason="needs 2+ CPU threads and an OpenBLAS whose threads can be set")


def _reference(a, b):
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(a.dtype)


@pytest.mark.parametrize("m, k, n", [(600, 300, 500),    # more rows: blocks of rows
                                     (64, 512, 4096),     # more columns: blocks of columns
                                     (7, 5, 3)])          # small: one plain product
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True)])
def test_cpu_matmul_equals_the_product(m, k, n, transpose_a, transpose_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if transpose_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n), dtype=np.float32)
    a, b = (a.T if transpose_a else a), (b.T if transpose_b else b)   # transposed views, as Linear passes them
    out = cpu_matmul(a, b)
    assert out.shape == (m, n) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, _reference(a, b), rtol=2e-5, atol=2e-5 * np.sqrt(k))


def test_cpu_matmul_float64_and_integers():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((500, 300)), rng.standard_normal((300, 600))
    np.testing.assert_allclose(cpu_matmul(a, b), a @ b, rtol=1e-12, atol=1e-12)
    ai, bi = rng.integers(-5, 5, (500, 300)), rng.integers(-5, 5, (300, 600))
    np.testing.assert_array_equal(cpu_matmul(ai, bi), ai @ bi)


@needs_threads
def test_products_are_shared_out_with_a_single_threaded_blas():
    get, _ = backend._openblas_thread_functions()
    before = get()
    seen = run_parallel(lambda piece: (piece, get()), [0, 1])
    assert seen == [(0, 1), (1, 1)]                  # each piece ran with one BLAS thread
    assert get() == before                           # and the count is restored after


def test_gelu_in_blocks_and_threads_equals_its_formula():
    """A GELU large enough to be cut into several blocks per thread, against the float64 formula."""
    rng = np.random.default_rng(3)
    x64 = rng.standard_normal(5 * common.CPU_BLOCK_ELEMENTS + 123) * 3
    g64 = rng.standard_normal(x64.shape)
    x = mm.Tensor(x64.astype(np.float32), requires_grad=True)
    y = mm.functional.gelu(x)
    y.backward(g64.astype(np.float32))
    k, c = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(k * (x64 + c * x64**3))
    np.testing.assert_allclose(y.data, 0.5 * x64 * (1 + t), rtol=1e-5, atol=1e-6)
    dydx = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * k * (1 + 3 * c * x64**2)
    np.testing.assert_allclose(x.grad, g64 * dydx, rtol=1e-4, atol=1e-5)


def test_adamw_in_blocks_and_threads_equals_its_formula():
    """AdamW on a parameter of several blocks per thread, 3 steps, against PyTorch's formula in float64."""
    rng = np.random.default_rng(4)
    n = 4 * common.CPU_BLOCK_ELEMENTS + 77
    p0 = rng.standard_normal(n)
    param = mm.Tensor(p0.astype(np.float32), requires_grad=True)
    opt = optim.AdamW([param], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    p, m, v = p0.copy(), np.zeros(n), np.zeros(n)
    for t in range(1, 4):
        g = rng.standard_normal(n)
        param.grad = g.astype(np.float32)
        opt.step()
        p *= 1 - 1e-2 * 0.1
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        p -= 1e-2 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
        np.testing.assert_allclose(param.data, p, rtol=1e-5, atol=1e-6)


def test_cpu_matmul_pair_equals_the_two_products():
    rng = np.random.default_rng(5)
    g, w, x = (rng.standard_normal(s, dtype=np.float32) for s in ((1024, 768), (768, 256), (1024, 256)))
    dx, dw = cpu_matmul_pair((g, w), (g.T, x))                     # a linear layer's two gradients
    np.testing.assert_allclose(dx, _reference(g, w), rtol=2e-5, atol=1e-3)
    np.testing.assert_allclose(dw, _reference(g.T, x), rtol=2e-5, atol=1e-3)


@needs_threads
def test_tune_cpu_threads_leaves_the_blas_single_threaded():
    get, set_ = backend._openblas_thread_functions()
    before, tuned = get(), backend.cpu_threads_tuned()
    try:
        assert backend.tune_cpu_threads() and get() == 1 and backend.cpu_threads_tuned()
    finally:
        set_(before)
        backend._cpu_threads_tuned = tuned


def test_large_adds_and_small_vocabulary_scatter_equal_numpy():
    rng = np.random.default_rng(6)
    a, b = (rng.standard_normal((2048, 384), dtype=np.float32) for _ in range(2))
    np.testing.assert_array_equal(common.cpu_add(a, b), a + b)
    np.testing.assert_array_equal(common.cpu_add(a.T, b.T), a.T + b.T)            # non-contiguous: one call
    ids = rng.integers(-65, 65, 2048)                                              # negative ids wrap, as in NumPy
    g = rng.standard_normal((2048, 48))
    table = rng.standard_normal((65, 48))
    expected = table.copy()
    mm.ops.shape.scatter_add(table, ids, g)                                        # the sorted path
    np.add.at(expected, ids, g)
    np.testing.assert_allclose(table, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m, k, n", [(600, 300, 500), (64, 512, 4096), (7, 5, 3)])   # rows, columns, one call
def test_cpu_matmul_adds_the_bias_in_each_block(m, k, n):
    rng = np.random.default_rng(7)
    a, w, bias = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (n, k), (n,)))
    out = cpu_matmul(a, w.T, bias)                                  # a linear layer's forward
    np.testing.assert_allclose(out, _reference(a, w.T) + bias, rtol=2e-5, atol=2e-5 * np.sqrt(k))


@pytest.mark.parametrize("rows", [1024, 5])                          # the two threads, and one call each
def test_cpu_matmul_pair_with_the_column_sum(rows):
    rng = np.random.default_rng(8)
    g, w, x = (rng.standard_normal(s, dtype=np.float32) for s in ((rows, 768), (768, 256), (rows, 256)))
    dx, dw, db = cpu_matmul_pair((g, w), (g.T, x), g)
    np.testing.assert_allclose(dx, _reference(g, w), rtol=2e-5, atol=1e-3)
    np.testing.assert_allclose(dw, _reference(g.T, x), rtol=2e-5, atol=1e-3)
    np.testing.assert_allclose(db, g.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-4)


@pytest.fixture
def stale_empty(monkeypatch):
    """np.empty hands out NaN-filled arrays, as stale memory could be: a buffer that is used
    before every element is written shows it."""
    real_full = np.full

    def nan_filled(shape, dtype=float, order="C", **_):
        return real_full(shape, np.nan, dtype=dtype, order=order)

    monkeypatch.setattr(np, "empty", nan_filled)


@pytest.mark.parametrize("shape", [(8, 16, 3, 4, 32), (2, 5, 3, 2, 2)])   # threads, and one pass
def test_qkv_gradient_covering_the_whole_array_needs_no_zeros(shape, stale_empty):
    """q, k, v = qkv[0], qkv[1], qkv[2] read every element once: the summed gradient is built in an
    uninitialised buffer, every element written once."""
    rng = np.random.default_rng(9)
    b, t, three, h, d = shape
    x = mm.Tensor(rng.standard_normal((b, t, three * h * d)).astype(np.float32), requires_grad=True)
    qkv = x.reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)        # (3, B, H, T, D), a view
    ws = [rng.standard_normal((b, h, t, d)).astype(np.float32) for _ in range(3)]
    loss = (qkv[0] * ws[0]).sum() + (qkv[1] * ws[1]).sum() + (qkv[2] * ws[2]).sum()
    loss.backward()
    expected = np.stack(ws).transpose(1, 3, 0, 2, 4).reshape(x.shape)
    np.testing.assert_array_equal(x.grad, expected)


def test_two_reads_of_one_row_still_sum():
    """x[0] read twice and x[1] once: not a cover of disjoint reads, so the zeros + sum path."""
    x = mm.Tensor(np.arange(6.0).reshape(3, 2), requires_grad=True)
    (x[0] * 2.0 + x[0] * 3.0 + x[1]).sum().backward()
    np.testing.assert_array_equal(x.grad, [[5.0, 5.0], [1.0, 1.0], [0.0, 0.0]])


@pytest.mark.parametrize("causal", [True, False])
def test_attention_on_strided_heads_copied_in_threads(causal, stale_empty):
    """Attention on the model's strided q, k, v views, large enough for the copies (and the scale on
    q) to be shared out between threads, with dK, dV zeroed per thread: values and gradients against
    the float64 formula."""
    rng = np.random.default_rng(10)
    b, t, h, d = 2, 160, 4, 64
    qkv64 = rng.standard_normal((b, t, 3, h, d))
    qkv = mm.Tensor(qkv64.astype(np.float32), requires_grad=True)
    heads = qkv.transpose(2, 0, 3, 1, 4)                            # (3, B, H, T, D) views
    out = mm.functional.scaled_dot_product_attention(heads[0], heads[1], heads[2], causal=causal)
    g = rng.standard_normal(out.shape)
    out.backward(g.astype(np.float32))
    q, k, v = (qkv64[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    scores = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(d)
    if causal:
        scores = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.data, p @ v, rtol=1e-4, atol=1e-5)
    dp = g @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(d)
    grads = np.stack([ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ g])   # (3, B, H, T, D)
    np.testing.assert_allclose(qkv.grad, grads.transpose(1, 3, 0, 2, 4), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- run_parallel's hand-off


def test_run_parallel_many_calls_keep_the_order_and_use_the_helpers():
    """10,000 splits of 1..5 pieces: results in piece order; with 2+ threads some ran off this thread."""
    import threading
    caller, others = threading.get_ident(), set()

    def work(piece):
        if threading.get_ident() != caller:
            others.add(threading.get_ident())
        return piece * piece

    for i in range(10_000):
        pieces = list(range(i % 5 + 1))
        assert run_parallel(work, pieces) == [p * p for p in pieces]
    assert len(others) == min(common.CPU_THREADS - 1, 4)


@needs_threads
@pytest.mark.parametrize("failing", [{0}, {1}, {0, 1}])
def test_run_parallel_raises_a_pieces_error_once_no_piece_is_running(failing):
    """The other thread's piece is slow: when the error comes out, it has finished (nothing
    still writes into the split's outputs), and the helpers take the next split as usual."""
    import time
    finished = []

    def work(piece):
        if piece in failing:
            raise ValueError(f"piece {piece}")
        time.sleep(0.05)
        finished.append(piece)
        return piece

    with pytest.raises(ValueError, match="piece") as raised:
        run_parallel(work, [0, 1])
    assert finished == sorted({0, 1} - failing)
    if 0 in failing:
        assert str(raised.value) == "piece 0"          # the caller's own error first
    assert run_parallel(lambda p: p + 1, [0, 1, 2]) == [1, 2, 3]


def test_nested_and_concurrent_splits_run_inline_without_deadlock():
    """A split from inside a piece (on the caller and on a helper) and splits from other threads."""
    import threading

    def inner(piece):
        return run_parallel(lambda q: (piece, q), [0, 1, 2])

    for _ in range(200):
        assert run_parallel(inner, [0, 1]) == [[(p, q) for q in range(3)] for p in range(2)]
    errors, out = [], {}

    def from_thread(t):
        try:
            out[t] = [run_parallel(lambda q: q * t, list(range(4))) for _ in range(300)]
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=from_thread, args=(t,)) for t in range(1, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and all(not thread.is_alive() for thread in threads)
    assert all(out[t] == [[q * t for q in range(4)]] * 300 for t in range(1, 4))


def _split_in_forked_child(queue):
    queue.put(run_parallel(lambda p: p + 10, [0, 1, 2, 3]))


@pytest.mark.skipif(not hasattr(__import__("os"), "register_at_fork"), reason="needs fork")
def test_run_parallel_in_a_forked_child():
    """A child forked after the helpers started has none of their threads: it must start its own."""
    import multiprocessing
    run_parallel(lambda p: p, [0, 1])                     # the parent's helpers are running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_forked_child, args=(queue,))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("run_parallel hung in a forked child")
    assert queue.get(timeout=5) == [10, 11, 12, 13]


@pytest.mark.parametrize("tq, tk", [(128, 128), (64, 256)])
def test_attention_softmax_tile_rows_of_any_magnitude(tq, tk):
    """The CPU tile softmax (row maximum taken with initial=−∞) against the float64 formula, on
    rows far below and far above exp's range (−300…−200 and 200…300: a maximum that started
    anywhere but −∞ or the row's own values would underflow or overflow them), and a NaN row."""
    from minillm.ops.attention import _softmax_rows_cpu_, causal_mask
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((3, tq, tk)) * 3
    scores[1] -= 250.0
    scores[2] += 250.0
    scores[0, 7, 3] = np.nan
    got = scores.astype(np.float32)
    scores = got.astype(np.float64)                     # the reference from the same float32 scores
    _softmax_rows_cpu_(got, causal=True)
    masked = np.where(causal_mask(tq, tk), -np.inf, scores)
    expected = np.exp(masked - masked.max(axis=-1, keepdims=True))
    expected /= expected.sum(axis=-1, keepdims=True)
    expected = np.where(causal_mask(tq, tk), 0.0, expected)    # masked keys 0, in the NaN row too (as
    visible = ~causal_mask(tq, tk)[7]                           # the C++ and CUDA rows leave them)
    assert np.isnan(got[0, 7, visible]).all() and (got[0, 7, ~visible] == 0).all()
    assert not np.isnan(np.delete(got[0], 7, axis=0)).any()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_elementwise_groups_in_threads_with_scratch_equals_numpy():
    """Groups of sizes from 0 to several blocks (so that the threads' shares cut through one),
    plus a non-contiguous one (a direct call): every element once, the scratch of the block's size."""
    from minillm.ops.common import elementwise_groups_in_threads
    rng = np.random.default_rng(6)
    block = common.CPU_BLOCK_ELEMENTS
    sizes = [0, 5, block, 3 * block + 11, 2 * block - 1, 300]
    groups = [(rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32),
               np.full(n, np.nan, np.float32)) for n in sizes]
    strided = rng.standard_normal((64, 40)).astype(np.float32)[:, ::2]
    groups.append((strided, strided + 1, np.full(strided.shape, np.nan, np.float32)))
    scratch_sizes = []

    def work(a, b, out, scratch, c):                      # out = a·b + c·a, through the scratch
        assert scratch.shape == a.shape and scratch.dtype == a.dtype
        scratch_sizes.append(scratch.size)
        np.multiply(a, b, out=scratch)
        np.multiply(a, c, out=out)
        out += scratch

    elementwise_groups_in_threads(work, groups, np.float32(0.5), scratch=True)
    for a, b, out in groups:
        np.testing.assert_array_equal(out, a * b + np.float32(0.5) * a)
    assert max(scratch_sizes) <= block


def test_adamw_on_many_parameters_in_one_split_equals_its_formula():
    """Parameters from 1 element to several blocks, float32 and float64 (two buckets), 3 steps."""
    rng = np.random.default_rng(7)
    block = common.CPU_BLOCK_ELEMENTS
    shapes = [(1,), (384,), (3, block // 3 + 5), (2 * block + 7,), (64, 33)]
    dtypes = [np.float32, np.float32, np.float32, np.float32, np.float64]
    p0 = [rng.standard_normal(s) for s in shapes]
    params = [mm.Tensor(p.astype(d), requires_grad=True) for p, d in zip(p0, dtypes)]
    opt = optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    state = [(p.copy(), np.zeros_like(p), np.zeros_like(p)) for p in p0]
    for t in range(1, 4):
        grads = [rng.standard_normal(s) for s in shapes]
        for param, g, d in zip(params, grads, dtypes):
            param.grad = g.astype(d)
        opt.step()
        for i, ((p, m, v), g) in enumerate(zip(state, grads)):
            p *= 1 - 1e-2 * 0.1
            m[...] = 0.9 * m + 0.1 * g
            v[...] = 0.99 * v + 0.01 * g * g
            p -= 1e-2 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
            np.testing.assert_allclose(params[i].data, p, rtol=1e-5, atol=1e-6)


def test_clip_sum_of_squares_in_threads_equals_numpy_and_repeats_exactly():
    """Gradients large enough for both threads (a share boundary inside one of them), a tiny one
    and an empty one: the total norm against float64 NumPy, the same bits on every call, and the
    clip's scaling of every element."""
    rng = np.random.default_rng(8)
    shapes = [(700, 500), (3,), (0,), (123_457,)]
    params = [mm.Tensor(np.zeros(s, np.float32), requires_grad=True) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    expected = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    norms = set()
    for _ in range(20):
        for p, g in zip(params, grads):
            p.grad = g.copy()
        norms.add(optim.clip_grad_norm_(params, max_norm=1.0))
    assert len(norms) == 1
    np.testing.assert_allclose(norms.pop(), expected, rtol=1e-6)
    scale = 1.0 / (expected + 1e-6)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * scale, rtol=1e-5, atol=1e-9)


@needs_threads
def test_run_parallel_after_a_wait_cut_short(monkeypatch):
    """Ctrl-C while the caller waits for a helper: the next split must not take that helper's
    late result for its own (it gets new helpers)."""
    import time
    real_collect = common._Helper.collect

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(common._Helper, "collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_parallel(lambda p: time.sleep(0.2 * p) or "old", [0, 1])
    monkeypatch.setattr(common._Helper, "collect", real_collect)
    assert run_parallel(lambda p: ("new", p), [0, 1]) == [("new", 0), ("new", 1)]
    time.sleep(0.3)                                    # the old helper finishes its piece meanwhile
    assert run_parallel(lambda p: ("newer", p), [0, 1]) == [("newer", 0), ("newer", 1)]


@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_attention_output_written_heads_last(p_drop, stale_empty):
    """O written as (B, T, H, D) memory: 3 sequences of 5 heads, T = 300 (query tiles of 128 rows and
    16 or 8 matrices, so tiles start and end inside a sequence), with and without dropout. Values
    against the float64 formula (the keep mask read back from a run with the same seed), and the
    model's transpose back to (B, T, H, D) is C-contiguous (its reshape to (B, T, C) needs no copy)."""
    from minillm.ops.attention import dropout_keep_mask
    rng = np.random.default_rng(11)
    b, h, t, d = 3, 5, 300, 16
    q64, k64, v64 = (rng.standard_normal((b, h, t, d)) for _ in range(3))
    mm.manual_seed(4)
    out = mm.functional.scaled_dot_product_attention(
        *(mm.Tensor(a.astype(np.float32)) for a in (q64, k64, v64)), causal=True, dropout_p=p_drop)
    assert out.shape == (b, h, t, d) and out.data.transpose(0, 2, 1, 3).flags.c_contiguous
    scores = np.einsum("bhid,bhjd->bhij", q64, k64) / np.sqrt(d)
    scores = np.where(np.triu(np.ones((t, t), bool), 1), -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if p_drop:
        mm.manual_seed(4)
        p = p * dropout_keep_mask((b, h, t, t), p_drop, "cpu") / (1 - p_drop)
    np.testing.assert_allclose(out.data, p @ v64, rtol=1e-4, atol=1e-5)
