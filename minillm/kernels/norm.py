"""Kernels behind ops/norm.py, for both devices.

CUDA (CuPy arrays): layer norm forward (one block per row) and backward (dx plus
per-block column sums for dw, db, then one reduction).

CPU (NumPy arrays, ``kernels/cpu.py``): layer norm and RMS norm as C++ row
loops, one pass to read a row's statistics and one to write it, forward and
backward, where the NumPy row blocks make six passes forward and ten backward.
The rows are shared out between CPU threads (``run_parallel``); in the backward
each thread sums dw and db over its own rows and the caller adds those up.

``layer_norm_fusable`` / ``rms_norm_fusable`` say whether a kernel takes the
arrays (the right one for their type); the op decides once, in its forward.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from . import cpu
from .common import ROW_HELPERS_SOURCE, fusable, multiprocessor_count, row_kernel, row_launch

_LAYER_NORM_SOURCE = ROW_HELPERS_SOURCE + r"""
// One row of x (rows, n) per block: y = (x - μ) r w + b, and the row's μ and r = 1/√(σ² + eps).
template <typename T>
__global__ void layer_norm_forward(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int n, T eps) {
    __shared__ T scratch[32];
    const long long row = blockIdx.x;
    x += row * n; y += row * n;
    T acc = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) acc += x[j];
    const T mu = block_sum(acc, scratch) / n;
    acc = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) { const T d = x[j] - mu; acc += d * d; }
    const T r = T(1) / sqrt(block_sum(acc, scratch) / n + eps);
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        y[j] = (x[j] - mu) * r * w[j] + (b ? b[j] : T(0));
    if (threadIdx.x == 0) { mean[row] = mu; rstd[row] = r; }
}

// rows_per_block rows per block. dx = r (g w - mean(g w) - x̂ mean(g w x̂)) row by row; each
// block also sums g x̂ and g over its rows into partial[0, block, :] and partial[1, block, :]
// (thread j owns columns j, j + blockDim.x, ...: no two threads touch the same column).
template <typename T>
__global__ void layer_norm_backward(const T* g, const T* x, const T* w, const T* mean, const T* rstd,
                                    T* dx, T* partial, int rows, int n, int rows_per_block) {
    __shared__ T scratch[32];
    T* partial_w = partial + (long long)blockIdx.x * n;
    T* partial_b = partial + ((long long)gridDim.x + blockIdx.x) * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) { partial_w[j] = 0; partial_b[j] = 0; }
    const int first = blockIdx.x * rows_per_block;
    const int last = min(first + rows_per_block, rows);
    for (int row = first; row < last; ++row) {
        const long long offset = (long long)row * n;
        const T mu = mean[row], r = rstd[row];
        T sum_gw = 0, sum_gw_xhat = 0;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const T x_hat = (x[offset + j] - mu) * r, gj = g[offset + j], gw = gj * w[j];
            sum_gw += gw;
            sum_gw_xhat += gw * x_hat;
            partial_w[j] += gj * x_hat;
            partial_b[j] += gj;
        }
        const T mean_gw = block_sum(sum_gw, scratch) / n;
        const T mean_gw_xhat = block_sum(sum_gw_xhat, scratch) / n;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const T x_hat = (x[offset + j] - mu) * r;
            dx[offset + j] = r * (g[offset + j] * w[j] - mean_gw - x_hat * mean_gw_xhat);
        }
    }
}
"""
_LAYER_NORM_NAMES = ("layer_norm_forward<{t}>", "layer_norm_backward<{t}>")


def _kernel(name, dtype):
    return row_kernel(_LAYER_NORM_SOURCE, _LAYER_NORM_NAMES, name, dtype)


def _layer_norm_forward_cuda(x, weight, bias, eps: float):
    """Layer norm over the last axis of a CuPy array, one block per row, one launch.
    Returns (y, mean, rstd) with mean and rstd of shape (..., 1), like the array path."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    x = cupy.ascontiguousarray(x)
    n = x.shape[-1]
    rows = x.size // n if n else 0
    out = cupy.empty_like(x)
    mean = cupy.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    rstd = cupy.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    if rows:
        kernel = _kernel("layer_norm_forward<{t}>", x.dtype)
        kernel((rows,), (row_launch(n),),
               (x, cupy.ascontiguousarray(weight), np.uintp(0) if bias is None else cupy.ascontiguousarray(bias),
                out, mean, rstd, np.int32(n), x.dtype.type(eps)))
    return out, mean, rstd


def _layer_norm_backward_cuda(grad, x, weight, mean, rstd):
    """Layer norm backward of CuPy arrays: (dx, dweight, dbias). One kernel writes dx and per-block column
    sums of g·x̂ and g (a few rows per block, ~4 blocks per multiprocessor); one reduction adds
    those partial sums up. Two launches."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    x, grad = cupy.ascontiguousarray(x), cupy.ascontiguousarray(grad, dtype=x.dtype)
    n = x.shape[-1]
    rows = x.size // n if n else 0
    dx = cupy.empty_like(x)
    if rows == 0:
        zeros = cupy.zeros(n, dtype=x.dtype)
        return dx, zeros, zeros.copy()
    rows_per_block = -(-rows // (4 * multiprocessor_count(x.device.id)))
    blocks = -(-rows // rows_per_block)
    partial = cupy.empty((2, blocks, n), dtype=x.dtype)
    kernel = _kernel("layer_norm_backward<{t}>", x.dtype)
    kernel((blocks,), (row_launch(n),),
           (grad, x, cupy.ascontiguousarray(weight), mean, rstd, dx, partial,
            np.int32(rows), np.int32(n), np.int32(rows_per_block)))
    grad_weight, grad_bias = partial.sum(axis=1)
    return dx, grad_weight, grad_bias


# ------------------------------------------------------------------ CPU (NumPy arrays)

_CPU_SOURCE = cpu.HEADER + r"""
// C++ row loops behind ops/norm.py for NumPy arrays (rows of n contiguous elements), compiled by
// kernels/cpu.py. Products and sums of an element are computed in the order written, which is the
// NumPy passes' order: fast math's reassociation (which the vectorised row sums do not need) would
// regroup (x - μ) r w as ((x - μ) w) r, and that overflows where x̂ = (x - μ) r does not (a row
// whose σ² overflows: r = 0, x̂ = 0 and y = b, not inf · 0 = NaN), and x̂ mean(g w x̂) in the backward
// as (x - μ)(r mean(g w x̂)), whose overflow gave an overflowing dx the sign of x - μ. (No cost
// measured: (2048, 768) float32 on one core, forward 0.70 / backward 0.69 ms either way.)
#pragma GCC optimize("no-tree-reassoc")
// T is float or double; a row's sums and a thread's column sums (dw, db) are
// accumulated in T: with -ffast-math the compiler keeps 8 (float) or 4 (double) running sums per
// vector register, so a row of 384 floats is added up as 8 sums of 48 terms. (Float rows summed
// in double instead: backward of (2048, 384) 0.35 -> 0.47 ms on one core, no change in dx
// beyond float32's rounding.)

// Layer norm forward: y = (x - μ) r w + b with μ = mean(x), σ² = mean((x - μ)²) (two passes: no
// cancellation), r = 1/√(σ² + eps); keeps each row's μ and r. b may be null (no bias).
template <typename T>
static void layer_norm_forward(const T* __restrict x, const T* __restrict w, const T* __restrict b,
                               T* __restrict y, T* __restrict mean, T* __restrict rstd,
                               long rows, long n, double eps) {
    for (long i = 0; i < rows; i++, x += n, y += n) {
        T sum = 0;
        for (long j = 0; j < n; j++) sum += x[j];
        const T mu = sum / n;
        T squares = 0;
        for (long j = 0; j < n; j++) { const T d = x[j] - mu; squares += d * d; }
        const T r = T(1) / sqrt(squares / n + T(eps));
        if (b) for (long j = 0; j < n; j++) y[j] = (x[j] - mu) * r * w[j] + b[j];
        else   for (long j = 0; j < n; j++) y[j] = (x[j] - mu) * r * w[j];
        mean[i] = mu;
        rstd[i] = r;
    }
}

// Layer norm backward: dx = r (g w - x̂ mean(g w x̂) - mean(g w)), x̂ = (x - μ) r rebuilt; adds
// Σ g x̂ and Σ g over these rows into dw and db (the calling thread's own partial sums).
template <typename T>
static void layer_norm_backward(const T* __restrict g, const T* __restrict x, const T* __restrict w,
                                const T* __restrict mean, const T* __restrict rstd, T* __restrict dx,
                                T* __restrict dw, T* __restrict db, long rows, long n) {
    for (long i = 0; i < rows; i++, g += n, x += n, dx += n) {
        const T mu = mean[i], r = rstd[i];
        T sum_gw = 0, sum_gw_xhat = 0;
        for (long j = 0; j < n; j++) {
            const T x_hat = (x[j] - mu) * r, gw = g[j] * w[j];
            sum_gw += gw;
            sum_gw_xhat += gw * x_hat;
            dw[j] += g[j] * x_hat;
            db[j] += g[j];
        }
        const T mean_gw = sum_gw / n, mean_gw_xhat = sum_gw_xhat / n;
        for (long j = 0; j < n; j++) dx[j] = r * (g[j] * w[j] - (x[j] - mu) * r * mean_gw_xhat - mean_gw);
    }
}

// RMS norm forward: y = x r w with r = 1/√(mean(x²) + eps); keeps each row's r.
template <typename T>
static void rms_norm_forward(const T* __restrict x, const T* __restrict w, T* __restrict y,
                             T* __restrict rstd, long rows, long n, double eps) {
    for (long i = 0; i < rows; i++, x += n, y += n) {
        T squares = 0;
        for (long j = 0; j < n; j++) squares += x[j] * x[j];
        const T r = T(1) / sqrt(squares / n + T(eps));
        for (long j = 0; j < n; j++) y[j] = x[j] * r * w[j];
        rstd[i] = r;
    }
}

// RMS norm backward: dx = r (g w - x̂ mean(g w x̂)), x̂ = x r; adds Σ g x̂ over these rows into dw.
template <typename T>
static void rms_norm_backward(const T* __restrict g, const T* __restrict x, const T* __restrict w,
                              const T* __restrict rstd, T* __restrict dx, T* __restrict dw, long rows, long n) {
    for (long i = 0; i < rows; i++, g += n, x += n, dx += n) {
        const T r = rstd[i];
        T sum_gw_xhat = 0;
        for (long j = 0; j < n; j++) {
            const T x_hat = x[j] * r;
            sum_gw_xhat += g[j] * w[j] * x_hat;
            dw[j] += g[j] * x_hat;
        }
        const T mean_gw_xhat = sum_gw_xhat / n;
        for (long j = 0; j < n; j++) dx[j] = r * (g[j] * w[j] - x[j] * r * mean_gw_xhat);
    }
}

#define ENTRIES(T, SUFFIX)                                                                               \
extern "C" void layer_norm_forward_##SUFFIX(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd,  \
                                            long rows, long n, double eps) {                             \
    layer_norm_forward<T>(x, w, b, y, mean, rstd, rows, n, eps); }                                        \
extern "C" void layer_norm_backward_##SUFFIX(const T* g, const T* x, const T* w, const T* mean,           \
                                             const T* rstd, T* dx, T* dw, T* db, long rows, long n) {    \
    layer_norm_backward<T>(g, x, w, mean, rstd, dx, dw, db, rows, n); }                                   \
extern "C" void rms_norm_forward_##SUFFIX(const T* x, const T* w, T* y, T* rstd, long rows, long n,       \
                                          double eps) {                                                  \
    rms_norm_forward<T>(x, w, y, rstd, rows, n, eps); }                                                   \
extern "C" void rms_norm_backward_##SUFFIX(const T* g, const T* x, const T* w, const T* rstd, T* dx,      \
                                           T* dw, long rows, long n) {                                   \
    rms_norm_backward<T>(g, x, w, rstd, dx, dw, rows, n); }

ENTRIES(float, f32)
ENTRIES(double, f64)
"""

_P, _N, _EPS = ctypes.c_void_p, ctypes.c_long, ctypes.c_double
_SIGNATURES = {                      # the entries' arguments: pointers, then (rows, n[, eps])
    "layer_norm_forward": [_P] * 6 + [_N, _N, _EPS],
    "layer_norm_backward": [_P] * 8 + [_N, _N],
    "rms_norm_forward": [_P] * 4 + [_N, _N, _EPS],
    "rms_norm_backward": [_P] * 6 + [_N, _N],
}


@functools.lru_cache(maxsize=None)
def _cpu_entries(suffix: str):
    """{name: compiled entry} for one dtype ('f32' / 'f64'), or None when it cannot be built."""
    lib = cpu.library("norm", _CPU_SOURCE)
    if lib is None:
        return None
    entries = {}
    for name, argtypes in _SIGNATURES.items():
        entry = getattr(lib, f"{name}_{suffix}")
        entry.argtypes, entry.restype = argtypes, None
        entries[name] = entry
    return entries


def _suffix(dtype) -> str:
    return "f32" if dtype == np.float32 else "f64"


def _entry(name: str, dtype):
    return _cpu_entries(_suffix(dtype))[name]


def _cpu_fusable(*arrays) -> bool:
    """NumPy arrays the C++ loops take (``cpu.fusable``), rows not empty of features, built."""
    return (cpu.fusable(*arrays) and arrays[0].ndim >= 1 and arrays[0].shape[-1] > 0
            and _cpu_entries(_suffix(arrays[0].dtype)) is not None)


def _split(rows: int, n: int, work) -> list:
    """``work(first, count)`` for one range of rows per CPU thread (``run_parallel``)."""
    from ..ops.common import row_ranges, run_parallel  # noqa: PLC0415 (ops imports kernels)

    return run_parallel(lambda part: work(part.start, part.stop - part.start), row_ranges(rows, n))


def _rows_of(x) -> tuple[int, int]:
    n = x.shape[-1]
    return x.size // n, n


# ------------------------------------------------------------------ what the ops call


def layer_norm_fusable(x, weight, bias=None) -> bool:
    """True when a fused kernel takes these arrays: the CUDA kernels for CuPy arrays
    (``fusable``), the C++ loops for NumPy ones (C-contiguous float32/float64, CPU kernels on)."""
    arrays = (x, weight) if bias is None else (x, weight, bias)
    if isinstance(x, np.ndarray):
        return _cpu_fusable(*arrays)
    return fusable(*arrays)


def rms_norm_fusable(x, weight) -> bool:
    """True when the C++ loops take these arrays (NumPy only: on a GPU RMS norm runs as array passes)."""
    return isinstance(x, np.ndarray) and _cpu_fusable(x, weight)


def layer_norm_forward(x, weight, bias, eps: float):
    """Layer norm over the last axis, fused: (y, mean, rstd), mean and rstd of shape (..., 1).
    Arrays that passed ``layer_norm_fusable``."""
    if not isinstance(x, np.ndarray):
        return _layer_norm_forward_cuda(x, weight, bias, eps)
    rows, n = _rows_of(x)
    y = np.empty_like(x)
    mean = np.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    rstd = np.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    entry = _entry("layer_norm_forward", x.dtype)
    step = n * x.itemsize                                   # bytes per row
    x_at, y_at, mean_at, rstd_at = x.ctypes.data, y.ctypes.data, mean.ctypes.data, rstd.ctypes.data
    w_at, b_at = weight.ctypes.data, (None if bias is None else bias.ctypes.data)

    def normalize(first: int, count: int) -> None:
        entry(x_at + first * step, w_at, b_at, y_at + first * step, mean_at + first * x.itemsize,
              rstd_at + first * x.itemsize, count, n, eps)

    if rows:
        _split(rows, n, normalize)
    return y, mean, rstd


def layer_norm_backward(grad, x, weight, mean, rstd):
    """Layer norm backward from what ``layer_norm_forward`` returned: (dx, dweight, dbias)."""
    if not isinstance(x, np.ndarray):
        return _layer_norm_backward_cuda(grad, x, weight, mean, rstd)
    grad = np.ascontiguousarray(grad, dtype=x.dtype)
    rows, n = _rows_of(x)
    dx = np.empty_like(x)
    entry = _entry("layer_norm_backward", x.dtype)
    step = n * x.itemsize
    g_at, x_at, dx_at, w_at = grad.ctypes.data, x.ctypes.data, dx.ctypes.data, weight.ctypes.data
    mean_at, rstd_at = mean.ctypes.data, rstd.ctypes.data

    def backward_rows(first: int, count: int):
        partial = np.zeros((2, n), dtype=x.dtype)           # this thread's Σ g x̂ and Σ g
        entry(g_at + first * step, x_at + first * step, w_at, mean_at + first * x.itemsize,
              rstd_at + first * x.itemsize, dx_at + first * step, partial.ctypes.data,
              partial.ctypes.data + n * x.itemsize, count, n)
        return partial

    partials = _split(rows, n, backward_rows) if rows else [np.zeros((2, n), dtype=x.dtype)]
    total = partials[0]
    for more in partials[1:]:
        total += more
    return dx, total[0], total[1]


def rms_norm_forward(x, weight, eps: float):
    """RMS norm over the last axis of a NumPy array, fused: (y, rstd), rstd of shape (..., 1)."""
    rows, n = _rows_of(x)
    y = np.empty_like(x)
    rstd = np.empty(x.shape[:-1] + (1,), dtype=x.dtype)
    entry = _entry("rms_norm_forward", x.dtype)
    step = n * x.itemsize
    x_at, y_at, rstd_at, w_at = x.ctypes.data, y.ctypes.data, rstd.ctypes.data, weight.ctypes.data

    def normalize(first: int, count: int) -> None:
        entry(x_at + first * step, w_at, y_at + first * step, rstd_at + first * x.itemsize, count, n, eps)

    if rows:
        _split(rows, n, normalize)
    return y, rstd


def rms_norm_backward(grad, x, weight, rstd):
    """RMS norm backward from what ``rms_norm_forward`` returned: (dx, dweight)."""
    grad = np.ascontiguousarray(grad, dtype=x.dtype)
    rows, n = _rows_of(x)
    dx = np.empty_like(x)
    entry = _entry("rms_norm_backward", x.dtype)
    step = n * x.itemsize
    g_at, x_at, dx_at, w_at, rstd_at = grad.ctypes.data, x.ctypes.data, dx.ctypes.data, weight.ctypes.data, rstd.ctypes.data

    def backward_rows(first: int, count: int):
        partial = np.zeros(n, dtype=x.dtype)                # this thread's Σ g x̂
        entry(g_at + first * step, x_at + first * step, w_at, rstd_at + first * x.itemsize,
              dx_at + first * step, partial.ctypes.data, count, n)
        return partial

    partials = _split(rows, n, backward_rows) if rows else [np.zeros(n, dtype=x.dtype)]
    total = partials[0]
    for more in partials[1:]:
        total += more
    return dx, total
