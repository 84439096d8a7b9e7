"""Helpers shared by every op family."""

from __future__ import annotations

import os
import threading

import numpy as np

from .. import backend
from ..kernels.matmul import cpu_blas_single_threaded, cpu_gemm
from ..tensor import Tensor


def unbroadcast(grad, shape: tuple[int, ...]):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting.

    If ``x`` of shape ``shape`` was broadcast to ``grad.shape`` in the forward
    pass, each element of ``x`` was used once per broadcast copy, so its
    gradient is the sum over those copies: over the leading axes that
    broadcasting added, and over the axes where ``shape`` has size 1.

    >>> unbroadcast(np.ones((2, 3, 4)), (3, 1)).tolist()
    [[8.0], [8.0], [8.0]]
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    size_one = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if size_one:
        grad = grad.sum(axis=size_one, keepdims=True)
    return grad


def normalize_axes(axis, ndim: int) -> tuple[int, ...]:
    """``axis`` (None, int or tuple, negatives allowed) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:                 # as NumPy: a 0-d tensor has no axis 0
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated axis in {axis}")
    return tuple(sorted(out))


def as_int_array(values, op_name: str, what: str):
    """Integer ids (a Tensor, array, list or number) as an integer array; TypeError otherwise.

    Shared by the ops that take ids rather than values (embedding, cross_entropy).
    An empty Python list becomes an empty integer array (NumPy would make it float64).
    """
    data = values.data if isinstance(values, Tensor) else values
    if not hasattr(data, "dtype") or isinstance(data, np.generic):
        data = np.asarray(data)
        if data.size == 0 and data.dtype.kind == "f":
            data = data.astype(np.int64)
    if data.dtype.kind not in "iu":
        raise TypeError(f"{op_name}: {what} must be integers, got dtype {data.dtype}")
    return data


# ------------------------------------------------------------ CPU threads
#
# NumPy runs each elementwise pass (exp, tanh, +, *) on one core, but releases
# the GIL while it runs. So a chain of passes over a big array goes ~2x faster
# on 2 cores when the rows are shared out between threads, each thread running
# the whole chain on its own rows. Matrix products are shared out the same way
# (``cpu_matmul``): one block of rows per thread, each a single-threaded BLAS
# call, rather than one call that the BLAS splits between its own threads.
# Only the CPU paths of a few hot ops use this.

CPU_THREADS = max(1, min(os.cpu_count() or 1, 8))
PARALLEL_MIN_ELEMENTS = 1 << 18   # below this, handing work to threads costs more than it saves
PARALLEL_MIN_MULTIPLY_ADDS = 1 << 22   # the same for a matrix product (m·k·n): ~25 µs of one core ...
BLAS_THREADS_MIN_MULTIPLY_ADDS = 1 << 26   # ... unless the BLAS runs its own threads (no tune_cpu_threads):
# then smaller products are left to them (they spin, ready at once, and mixing theirs and ours costs)


def row_ranges(n_rows: int, n_cols: int) -> list[slice]:
    """Split ``n_rows`` rows into one contiguous range per CPU thread (a single one when small)."""
    parts = CPU_THREADS if n_rows * n_cols >= PARALLEL_MIN_ELEMENTS else 1
    parts = max(1, min(parts, n_rows))
    bounds = [n_rows * i // parts for i in range(parts + 1)]
    return [slice(b0, b1) for b0, b1 in zip(bounds[:-1], bounds[1:])]


class _Helper:
    """One persistent thread that runs the pieces a split hands it, then signals back.

    The hand-off is two locks used as binary semaphores: ``_start`` (released by
    the caller once the job is in place) and ``_done`` (released by the helper
    once the results are in). A ThreadPoolExecutor future costs a work item, a
    queue, a condition and a future per piece; this costs two lock operations each
    way. Measured (2 cores, quiet moments): a split of two empty pieces 18–20 -> 12 µs,
    ~1 ms of the ~180 splits of a ``minillm bench train`` step: not measurable in the
    step itself (futures against helpers, alternating step by step in one process,
    15 steps each, twice: 708.4 / 708.8 and 702.7 / 705.8 ms, load ~1.3). What it
    adds is the contract of ``run_parallel``: every piece has finished before an
    error comes out, the caller's own error first, and nested splits run inline.
    """

    def __init__(self, index: int) -> None:
        self._start, self._done = threading.Lock(), threading.Lock()
        self._start.acquire()
        self._done.acquire()
        self._job = self._outcome = None
        threading.Thread(target=self._loop, name=f"minillm-cpu-{index}", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._start.acquire()                  # sleeps until a job is handed over
            work, pieces = self._job
            try:
                self._outcome = ([work(piece) for piece in pieces], None)
            except BaseException as error:          # noqa: BLE001 (re-raised on the caller's thread)
                self._outcome = (None, error)
            self._job = None
            self._done.release()

    def hand(self, work, pieces: list) -> None:
        self._job = (work, pieces)
        self._start.release()

    def collect(self) -> tuple:
        """Wait for the job handed over: (results, None) or (None, the exception it raised)."""
        self._done.acquire()
        outcome, self._outcome = self._outcome, None
        return outcome


_helpers: list[_Helper] = []
_split_running = threading.Lock()   # held while a split uses the helpers


def _forget_helpers_after_fork() -> None:
    """A forked child (distributed ranks, tokenizer workers) has none of the parent's threads."""
    global _split_running
    _helpers.clear()
    _split_running = threading.Lock()


if hasattr(os, "register_at_fork"):     # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_forget_helpers_after_fork)


def run_parallel(work, pieces: list) -> list:
    """``[work(piece) for piece in pieces]``, the pieces shared out between CPU threads when several.

    The calling thread runs ``pieces[0]`` (and every ``CPU_THREADS``-th after it)
    itself; each of ``CPU_THREADS - 1`` persistent helper threads (``_Helper``)
    runs its own share. A split started while another is running — from inside
    a piece (nested), or from another thread — runs its pieces inline on its own
    thread: the helpers are busy, and waiting for them could deadlock. An
    exception in any piece is raised here once every piece has finished (the
    caller's own first). While they run, the BLAS is single-threaded: a product
    inside a piece (a row sum through BLAS, an attention tile) would otherwise
    start the BLAS's own threads too, more busy threads than cores.
    """
    if len(pieces) <= 1 or CPU_THREADS == 1 or not _split_running.acquire(blocking=False):
        return [work(piece) for piece in pieces]
    try:
        while len(_helpers) < CPU_THREADS - 1:
            _helpers.append(_Helper(len(_helpers) + 1))
        shares = min(len(pieces), CPU_THREADS)      # share i: pieces i, i + shares, i + 2·shares, ...
        with backend.blas_threads(1):
            for i, helper in enumerate(_helpers[: shares - 1], start=1):
                helper.hand(work, pieces[i::shares])
            try:
                mine = [work(piece) for piece in pieces[::shares]]
            finally:                                # wait for the helpers even if a piece here failed
                try:
                    outcomes = [helper.collect() for helper in _helpers[: shares - 1]]
                except BaseException:               # a wait cut short (Ctrl-C): those helpers may still be
                    _helpers.clear()                # running; later splits start new ones
                    raise
    finally:
        _split_running.release()
    results = [None] * len(pieces)
    results[::shares] = mine
    for i, (theirs, error) in enumerate(outcomes, start=1):
        if error is not None:
            raise error
        results[i::shares] = theirs
    return results


# Elements per call of an elementwise chain on the CPU (GELU, AdamW): its 8–13 passes
# then run over blocks that stay in the core's L2 cache instead of main memory
# (GELU forward + backward on (8, 256, 1536): 20.7 -> 17.5 ms of CPU time).
CPU_BLOCK_ELEMENTS = 1 << 17


def elementwise_in_threads(work, arrays, *args, scratch: bool = False) -> None:
    """``work(*arrays, *args)`` for a chain of elementwise passes over same-shaped arrays,
    run over contiguous pieces of the flattened arrays: one piece per CPU thread
    (``run_parallel``), each piece in blocks of ``CPU_BLOCK_ELEMENTS``, all the
    passes of a block while it is in cache. ``work`` must treat every element on
    its own (no reductions). ``elementwise_groups_in_threads`` with one group.
    """
    elementwise_groups_in_threads(work, [arrays], *args, scratch=scratch)


def elementwise_groups_in_threads(work, groups, *args, scratch: bool = False, blocks: bool = True) -> None:
    """``work(*arrays, *args)`` for every group (a tuple of same-shaped arrays), as one split.

    The elements of all groups, end to end, are cut into one contiguous share per
    CPU thread, and each share runs over its groups' elements in blocks of
    ``CPU_BLOCK_ELEMENTS``: ``work(*(a[block] for a in group), *args)``. AdamW
    updates every parameter this way in one split, where it was one split per
    parameter with the small ones (biases, norms) on one core: its step 26.8–29.5
    -> 24.1–24.8 ms (medians of 12 steps each, alternating in one process, load
    1.3–1.6). With ``scratch`` ``work`` gets one more array after the group's, a
    temporary of the block's shape for its intermediate results: one per thread
    (``_thread_scratch``), reused block after block (it stays in cache), so ``work``
    must not itself run such a chain. With ``blocks=False`` each share's piece of a
    group is one call (for a compiled loop that makes a single pass anyway: fewer
    calls). Groups of GPU arrays or non-contiguous ones: one call each, here.
    """
    flat = []
    for arrays in groups:
        if isinstance(arrays[0], np.ndarray) and all(a.flags.c_contiguous for a in arrays):
            flat.append([a.reshape(-1) for a in arrays])
        else:
            extra = (backend.array_module(arrays[0]).empty_like(arrays[0]),) if scratch else ()
            work(*arrays, *extra, *args)

    def run_share(share):
        for i, part in share:
            arrays = flat[i]
            step = CPU_BLOCK_ELEMENTS if blocks else max(1, part.stop - part.start)
            for start in range(part.start, part.stop, step):
                block = slice(start, min(start + step, part.stop))
                extra = (_thread_scratch(arrays[0].dtype)[: block.stop - block.start],) if scratch else ()
                work(*(a[block] for a in arrays), *extra, *args)

    if flat:
        run_parallel(run_share, group_shares([arrays[0].size for arrays in flat]))


_scratch = threading.local()     # each thread's block-sized work arrays, one per dtype, kept between calls


def _thread_scratch(dtype) -> np.ndarray:
    """This thread's scratch array of ``CPU_BLOCK_ELEMENTS`` elements of ``dtype``: made once, so an
    AdamW step allocates nothing after the first (tests/train/test_promises.py)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.size < CPU_BLOCK_ELEMENTS:
        buffer = buffers[dtype] = np.empty(CPU_BLOCK_ELEMENTS, dtype=dtype)
    return buffer


def group_shares(sizes: list[int]) -> list[list[tuple[int, slice]]]:
    """The elements of groups of ``sizes`` elements, end to end, cut into one contiguous share
    per CPU thread (``row_ranges``: one share when few); each share as its pieces, (group
    index, slice of that group's flattened elements), in order.

    >>> group_shares([3, 0, 5]) == [[(0, slice(0, 3)), (2, slice(0, 5))]]
    True
    """
    starts = np.cumsum([0] + list(sizes)).tolist()     # group i: elements starts[i] .. starts[i+1]-1
    shares = []
    for share in row_ranges(starts[-1], 1):
        pieces = []
        for i, (first, end) in enumerate(zip(starts[:-1], starts[1:])):
            lo, hi = max(share.start, first), min(share.stop, end)
            if lo < hi:
                pieces.append((i, slice(lo - first, hi - first)))
        shares.append(pieces)
    return shares


def cpu_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b``; for two large same-shaped float arrays (the residual stream), on both cores."""
    if (a.shape != getattr(b, "shape", None) or a.dtype != b.dtype or a.dtype.kind != "f"
            or a.size < PARALLEL_MIN_ELEMENTS or CPU_THREADS == 1):
        return a + b
    out = np.empty(a.shape, dtype=a.dtype)
    elementwise_in_threads(lambda x, y, z: np.add(x, y, out=z), (a, b, out))
    return out


def _min_multiply_adds() -> int:
    return PARALLEL_MIN_MULTIPLY_ADDS if backend.cpu_threads_tuned() else BLAS_THREADS_MIN_MULTIPLY_ADDS


def _can_split_products() -> bool:
    """Whether a product's pieces can run one per thread, each on one core: the BLAS that
    ``cpu_gemm`` calls is single-threaded by design (MKL's sequential layer), or its threads
    can be held at one inside a split (NumPy's OpenBLAS, ``backend.blas_threads``)."""
    return cpu_blas_single_threaded() or backend.can_limit_blas_threads()


def _block_product(a, b, out, bias=None) -> None:
    """out = a @ b (+ bias, broadcast over the rows) for one thread's block: one CBLAS call
    (``cpu_gemm``) into ``out`` pre-filled with the bias (beta = 1, no pass over the result after
    it); dtypes CBLAS does not have (float16) through ``np.matmul``."""
    if a.dtype not in (np.float32, np.float64):
        np.matmul(a, b, out=out)
        if bias is not None:
            out += bias
    elif bias is None:
        cpu_gemm(a, b, out=out)
    else:
        out[...] = bias
        cpu_gemm(a, b, out=out, accumulate=True)


def cpu_matmul_pair(first: tuple, second: tuple, column_sum=None) -> tuple:
    """``(a1 @ b1, a2 @ b2)`` for two independent products of about the same size, like a
    linear layer's dx = dy W and dW = dyᵀ x (the same multiply-adds). With two CPU threads
    each takes one whole product (single-threaded BLAS): ~5% less CPU time than cutting
    both into blocks, and no operand packed twice. Otherwise ``cpu_matmul`` on each in turn.

    With ``column_sum`` (an (N, C) array: a linear layer's dy, whose column sums are its bias
    gradient) the result has a third entry, ``column_sum.sum(axis=0)``, computed by the first
    product's thread after its product: dx = dy W is the quicker of the two (dW = dyᵀ x runs
    ~8% slower in OpenBLAS), so the sum fills the wait instead of running after both.
    """
    (a1, b1), (a2, b2) = first, second
    whole = (CPU_THREADS == 2 and _can_split_products()
             and all(a.ndim == 2 and a.dtype == a1.dtype for a in (a1, b1, a2, b2)) and a1.dtype.kind == "f"
             and min(a1.shape[0] * a1.shape[1] * b1.shape[1], a2.shape[0] * a2.shape[1] * b2.shape[1])
             >= _min_multiply_adds())
    if not whole:
        products = cpu_matmul(a1, b1), cpu_matmul(a2, b2)
        return products if column_sum is None else products + (column_sum.sum(axis=0),)

    def work(which):
        a, b = (a1, b1) if which == 0 else (a2, b2)
        product = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        _block_product(a, b, product)
        if which == 1:
            return product
        return product, (None if column_sum is None else column_sum.sum(axis=0))

    (product1, sums), product2 = run_parallel(work, [0, 1])
    return (product1, product2) if column_sum is None else (product1, product2, sums)


def cpu_matmul(a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``a @ b`` (plus ``bias``, broadcast over its rows, when given) for NumPy arrays; a large
    2-D product runs as one block per CPU thread.

    The result's rows (or, when it has more columns than rows, its columns) are
    shared out: thread i computes ``out[rows_i] = a[rows_i] @ b`` with a
    single-threaded BLAS, and the threads meet once, at the end. Left to
    itself, OpenBLAS splits one product between its threads panel by panel and
    makes them wait for each other at every panel: on a busy machine a thread
    that is descheduled stalls the other, which spins (CPU time spent on
    nothing), and for the weight gradient of a linear layer (dyᵀ x: a small
    (out, in) result over a long inner axis of B·T) its split ran at 14–60
    GFLOP/s where one core alone gives ~150. Each block costs one extra packing
    of ``b`` (k·n of m·k·n work: nothing for these shapes). Each thread adds the
    bias to its own block (a linear layer's forward: the pass over the output
    runs on both cores, not after the product on one): the block is filled with
    the bias and the product added to it (``_block_product``). Each block is one
    ``cpu_gemm`` (kernels/matmul.py: MKL when installed, else NumPy's OpenBLAS).
    Small products, batched ones, other dtypes, or a BLAS whose threads cannot
    be held at one: ``a @ b``; but when training (``tune_cpu_threads``: NumPy's
    BLAS single-threaded) a 2-D product is one ``cpu_gemm`` on MKL, so that every
    linear layer runs on its kernels, with one thread or two. Not when generating:
    there OpenBLAS's threads share the small products that the KV cache leaves
    (one row at a time, bound by memory: gpt2-124m decoding 30.5 tokens/s on
    one MKL thread, 42.6 with OpenBLAS's two).
    """
    m, n = (a.shape[0], b.shape[-1]) if a.ndim == 2 == b.ndim else (0, 0)
    if (m * a.shape[-1] * n < _min_multiply_adds() or CPU_THREADS == 1 or a.dtype != b.dtype
            or a.dtype.kind != "f" or not _can_split_products()):
        if a.ndim == 2 == b.ndim and a.dtype == b.dtype and cpu_blas_single_threaded() and backend.cpu_threads_tuned():
            out = np.empty((m, n), dtype=a.dtype)           # one thread either way: MKL's kernels
            _block_product(a, b, out, bias)
            return out
        out = a @ b
        if bias is not None:
            out += bias
        return out
    out = np.empty((m, n), dtype=a.dtype)
    if m >= n:      # blocks of rows: out[s] = a[s] @ b
        def rows(s):
            _block_product(a[s], b, out[s], bias)
        run_parallel(rows, row_ranges(m, PARALLEL_MIN_ELEMENTS))
    else:           # blocks of columns: out[:, s] = a @ b[:, s]
        def columns(s):
            _block_product(a, b[:, s], out[:, s], None if bias is None else bias[s])
        run_parallel(columns, row_ranges(n, PARALLEL_MIN_ELEMENTS))
    return out
