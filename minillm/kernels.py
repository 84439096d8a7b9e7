"""Fused CUDA kernels for the GPU hot paths (the only CUDA code in minillm).

Each kernel is a small function with a docstring saying what it computes; it
is compiled on first use and cached, and CuPy is imported only inside these
functions, so importing this module costs nothing without a GPU. An op selects
a kernel only when its arrays are CuPy arrays, and every kernel is tested equal
to the array-module (NumPy/CuPy) version of the same math.
"""

from __future__ import annotations

import functools


# ================================================================ attention softmax
#
# Row-wise kernels over the (…, Tq, Tk) attention matrix, one CUDA block per
# row (query), so the causal mask, the max, the sum and the normalisation of a
# row are one launch instead of five, and the masked half of a causal row is
# never read. Query i of Tq attends keys j <= i + causal_offset (offset =
# Tk - Tq: the queries are the last Tq positions); with ``causal`` off every
# query attends every key.

_ATTENTION_SOFTMAX_SOURCE = r"""
#include <cuda_fp16.h>

template <typename A> __device__ A negative_infinity();
template <> __device__ float negative_infinity<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ double negative_infinity<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

template <typename A> __device__ A warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
template <typename A> __device__ A warp_max(A v) {
    for (int o = 16; o > 0; o >>= 1) { A w = __shfl_xor_sync(0xffffffffu, v, o); v = w > v ? w : v; }
    return v;
}
// Reduce one value per thread over the block (blockDim.x a multiple of 32); every thread gets it.
template <typename A, bool IS_MAX> __device__ A block_reduce(A v, A* scratch, A identity) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = threadIdx.x < n_warps ? scratch[threadIdx.x] : identity;
    if (warp == 0) v = IS_MAX ? warp_max(v) : warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    const A result = scratch[0];
    __syncthreads();  // scratch is reused by the next reduction
    return result;
}

// scores (rows, tk), row-major, in place -> softmax over each row's unmasked keys; masked -> 0.
template <typename T, typename A>
__global__ void attention_softmax_forward(T* scores, int tq, int tk, int causal, int causal_offset) {
    __shared__ A scratch[32];
    const long long row = blockIdx.x;
    T* x = scores + row * (long long)tk;
    const int last = causal ? min(tk - 1, (int)(row % tq) + causal_offset) : tk - 1;
    A row_max = negative_infinity<A>();
    for (int j = threadIdx.x; j <= last; j += blockDim.x) { A s = (A)x[j]; row_max = s > row_max ? s : row_max; }
    row_max = block_reduce<A, true>(row_max, scratch, negative_infinity<A>());
    A row_sum = 0;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) row_sum += exp((A)x[j] - row_max);
    row_sum = block_reduce<A, false>(row_sum, scratch, (A)0);
    const A inv_sum = (A)1 / row_sum;
    for (int j = threadIdx.x; j < tk; j += blockDim.x)
        x[j] = (T)(j <= last ? exp((A)x[j] - row_max) * inv_sum : (A)0);
}

// grad (rows, tk) holds dL/dP in place -> dL/dS = P * (dP - sum_j dP_j P_j).
// With keep != nullptr, dP is first the gradient of the dropped-out P: dP <- dP * keep * keep_scale.
template <typename T, typename A>
__global__ void attention_softmax_backward(T* grad, const T* probs, const bool* keep, A keep_scale,
                                           int tq, int tk, int causal, int causal_offset) {
    __shared__ A scratch[32];
    const long long row = blockIdx.x;
    T* g = grad + row * (long long)tk;
    const T* p = probs + row * (long long)tk;
    const bool* m = keep ? keep + row * (long long)tk : nullptr;
    const int last = causal ? min(tk - 1, (int)(row % tq) + causal_offset) : tk - 1;
    A dot = 0;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) {
        A dp = (A)g[j];
        if (m) dp = m[j] ? dp * keep_scale : (A)0;
        dot += dp * (A)p[j];
    }
    dot = block_reduce<A, false>(dot, scratch, (A)0);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        A ds = 0;
        if (j <= last) {
            A dp = (A)g[j];
            if (m) dp = m[j] ? dp * keep_scale : (A)0;
            ds = (A)p[j] * (dp - dot);
        }
        g[j] = (T)ds;
    }
}
"""

_ATTENTION_TYPES = {"float32": ("float", "float"), "float64": ("double", "double"), "float16": ("__half", "float")}


@functools.lru_cache(maxsize=None)
def _attention_softmax_module():
    import cupy  # noqa: PLC0415

    names = []
    for t, a in _ATTENTION_TYPES.values():
        names += [f"attention_softmax_forward<{t}, {a}>", f"attention_softmax_backward<{t}, {a}>"]
    return cupy.RawModule(code=_ATTENTION_SOFTMAX_SOURCE, options=("--std=c++14",), name_expressions=names)


def _attention_kernel(kind: str, dtype):
    if dtype.name not in _ATTENTION_TYPES:
        raise TypeError(f"attention softmax kernel: unsupported dtype {dtype}")
    t, a = _ATTENTION_TYPES[dtype.name]
    return _attention_softmax_module().get_function(f"attention_softmax_{kind}<{t}, {a}>")


def _check_rows(*arrays) -> None:
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError("attention softmax kernels need C-contiguous (…, Tq, Tk) arrays")


def _row_launch(tk: int) -> int:
    """Threads per row block: ~4 keys per thread, a multiple of 32, at most 1024."""
    threads = 32
    while threads < 1024 and threads * 4 < tk:
        threads *= 2
    return threads


def attention_softmax_forward_(scores, causal: bool):
    """In place on a C-contiguous CuPy array (…, Tq, Tk): the causal mask and a stable softmax.

    Row i (query i of Tq) keeps keys j <= i + (Tk - Tq) when ``causal`` (all keys
    otherwise), becomes exp(s - max) / Σ exp(s - max) there and 0 on the masked
    keys. Equals ``softmax(where(mask, -inf, scores))`` of the array-module path.
    """
    import numpy as np  # noqa: PLC0415

    tq, tk = scores.shape[-2], scores.shape[-1]
    rows = scores.size // tk
    if rows == 0 or tk == 0:
        return scores
    _check_rows(scores)
    kernel = _attention_kernel("forward", scores.dtype)
    kernel((rows,), (_row_launch(tk),), (scores, np.int32(tq), np.int32(tk), np.int32(causal), np.int32(tk - tq)))
    return scores


def attention_softmax_backward_(grad_probs, probs, causal: bool, keep=None, keep_scale: float = 1.0):
    """In place on C-contiguous CuPy arrays (…, Tq, Tk): dL/dP -> dL/dscores of the softmax.

    dS = P ⊙ (dP − rowsum(dP ⊙ P)); masked keys get 0. With a dropout ``keep``
    mask (bool, same shape), ``grad_probs`` is the gradient of the dropped-out
    probabilities and is first multiplied by keep · keep_scale.
    """
    import numpy as np  # noqa: PLC0415

    tq, tk = probs.shape[-2], probs.shape[-1]
    rows = probs.size // tk
    if rows == 0 or tk == 0:
        return grad_probs
    _check_rows(grad_probs, probs, keep)
    kernel = _attention_kernel("backward", probs.dtype)
    accumulate = np.float64 if probs.dtype == np.float64 else np.float32
    kernel((rows,), (_row_launch(tk),),
           (grad_probs, probs, keep if keep is not None else np.uintp(0), accumulate(keep_scale),
            np.int32(tq), np.int32(tk), np.int32(causal), np.int32(tk - tq)))
    return grad_probs


# ================================================================ gelu, layer norm, softmax, cross-entropy
#
# The kernels behind ops/activation.py, ops/norm.py and ops/loss.py. GELU is
# one elementwise kernel each way. The others work on rows (the last axis) with
# one CUDA block per row: the block's threads stride over the row, combine
# their partial results with warp shuffles (block_sum / block_max_sumexp), and
# every thread then knows the row's statistics. The (max, Σexp) pair is built
# in one pass ("online softmax": when a larger value arrives, rescale the sum
# by exp(old_max - new_max)), so softmax and cross-entropy read a row once for
# their statistics.

_ROW_KERNELS_SOURCE = r"""
template <typename T> __device__ T minus_infinity();
template <> __device__ float minus_infinity<float>() { return __int_as_float(0xff800000); }
template <> __device__ double minus_infinity<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

template <typename T> __device__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of one value per thread over the block (blockDim.x a multiple of 32); every thread gets it.
template <typename T> __device__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = warp_sum(lane < n_warps ? scratch[lane] : T(0));
    __syncthreads();  // scratch is reused by the next reduction
    return v;
}

// (m, s) <- (m, s) ⊕ (m2, s2), where (m, s) stands for "max m, Σ exp(x - m) = s".
template <typename T> __device__ void merge_max_sumexp(T& m, T& s, T m2, T s2) {
    const T top = m > m2 ? m : m2;
    if (top == minus_infinity<T>()) return;  // both empty
    s = s * exp(m - top) + s2 * exp(m2 - top);
    m = top;
}

// Row max and Σ exp(x - max) from each thread's running pair; every thread gets the row's pair.
template <typename T> __device__ void block_max_sumexp(T& m, T& s, T* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1)
        merge_max_sumexp(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) { scratch[warp] = m; scratch[32 + warp] = s; }
    __syncthreads();
    m = lane < n_warps ? scratch[lane] : minus_infinity<T>();
    s = lane < n_warps ? scratch[32 + lane] : T(0);
    for (int o = 16; o > 0; o >>= 1)
        merge_max_sumexp(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    __syncthreads();
}

// This thread's running (max, Σexp) over x[threadIdx.x], x[threadIdx.x + blockDim.x], ...
template <typename T> __device__ void thread_max_sumexp(const T* x, int n, T& m, T& s) {
    m = minus_infinity<T>(); s = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const T v = x[j];
        if (v > m) { s = s * exp(m - v) + T(1); m = v; }
        else if (m != minus_infinity<T>()) s += exp(v - m);  // (-inf entries, e.g. masked logits, add 0)
    }
}

// y = softmax(x) (or log_softmax when LOG) of each row of x (rows, n).
template <typename T, bool LOG>
__global__ void softmax_forward(const T* x, T* y, int n) {
    __shared__ T scratch[64];
    const long long offset = (long long)blockIdx.x * n;
    x += offset; y += offset;
    T m, s;
    thread_max_sumexp(x, n, m, s);
    block_max_sumexp(m, s, scratch);
    if (LOG) {
        const T log_s = log(s);
        for (int j = threadIdx.x; j < n; j += blockDim.x) y[j] = (x[j] - m) - log_s;
    } else {
        const T inv_sum = T(1) / s;
        for (int j = threadIdx.x; j < n; j += blockDim.x) y[j] = exp(x[j] - m) * inv_sum;
    }
}

// dx = y (g - Σ g y) for softmax; dx = g - exp(y) Σ g for log_softmax (y the saved output).
template <typename T, bool LOG>
__global__ void softmax_backward(const T* g, const T* y, T* dx, int n) {
    __shared__ T scratch[32];
    const long long offset = (long long)blockIdx.x * n;
    g += offset; y += offset; dx += offset;
    T acc = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) acc += LOG ? g[j] : g[j] * y[j];
    acc = block_sum(acc, scratch);
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        dx[j] = LOG ? g[j] - exp(y[j]) * acc : y[j] * (g[j] - acc);
}

// Row n of z (rows, n_classes): m = max z_n, log_sum = log Σ exp(z_n - m) (logsumexp = m + log_sum,
// kept apart: their sum would round in float32 for large logits), loss = log_sum - (z_n[t_n] - m).
template <typename T>
__global__ void cross_entropy_forward(const T* z, const long long* targets, const bool* valid,
                                      T* losses, T* row_max, T* log_sum, int n_classes) {
    __shared__ T scratch[64];
    const long long row = blockIdx.x;
    z += row * n_classes;
    T m, s;
    thread_max_sumexp(z, n_classes, m, s);
    block_max_sumexp(m, s, scratch);
    if (threadIdx.x == 0) {
        const T log_s = log(s);
        row_max[row] = m;
        log_sum[row] = log_s;
        losses[row] = valid[row] ? log_s - (z[targets[row]] - m) : T(0);
    }
}

// dz_nc = g_n (exp((z_nc - m_n) - log_sum_n) - [c = t_n]), written straight into dz: the only
// (rows, n_classes) buffer.
template <typename T>
__global__ void cross_entropy_backward(const T* z, const T* row_max, const T* log_sum, const long long* targets,
                                       const T* row_grad, T* dz, int n_classes) {
    const long long row = blockIdx.x;
    const long long offset = row * n_classes;
    z += offset; dz += offset;
    const T m = row_max[row], log_s = log_sum[row], g = row_grad[row];
    const long long target = targets[row];
    for (int j = threadIdx.x; j < n_classes; j += blockDim.x)
        dz[j] = g * (exp((z[j] - m) - log_s) - (j == target ? T(1) : T(0)));
}

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

_ROW_KERNEL_TYPES = {"float32": "float", "float64": "double"}
_ROW_KERNEL_NAMES = ("softmax_forward<{t}, false>", "softmax_forward<{t}, true>",
                     "softmax_backward<{t}, false>", "softmax_backward<{t}, true>",
                     "cross_entropy_forward<{t}>", "cross_entropy_backward<{t}>",
                     "layer_norm_forward<{t}>", "layer_norm_backward<{t}>")


def fusable(*arrays) -> bool:
    """True when every array is a CuPy array of float32 or float64, the dtypes the kernels
    of this section are compiled for (NumPy arrays and other dtypes take the array path)."""
    import numpy as np  # noqa: PLC0415

    from .backend import array_module  # noqa: PLC0415

    return all(
        not isinstance(a, np.ndarray) and array_module(a) is not np and a.dtype.name in _ROW_KERNEL_TYPES
        for a in arrays
    )


@functools.lru_cache(maxsize=None)
def _row_kernels_module():
    import cupy  # noqa: PLC0415

    names = [n.format(t=t) for t in _ROW_KERNEL_TYPES.values() for n in _ROW_KERNEL_NAMES]
    return cupy.RawModule(code=_ROW_KERNELS_SOURCE, options=("--std=c++14",), name_expressions=names)


def _row_kernel(name: str, dtype):
    return _row_kernels_module().get_function(name.format(t=_ROW_KERNEL_TYPES[dtype.name]))


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_id: int) -> int:
    import cupy  # noqa: PLC0415

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def softmax_forward(x, log: bool = False):
    """softmax (``log``: log-softmax) over the last axis of a CuPy array: one block per row, one launch."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    x = cupy.ascontiguousarray(x)
    n = x.shape[-1]
    out = cupy.empty_like(x)
    rows = x.size // n if n else 0
    if rows:
        kernel = _row_kernel("softmax_forward<{t}, %s>" % ("true" if log else "false"), x.dtype)
        kernel((rows,), (_row_launch(n),), (x, out, np.int32(n)))
    return out


def softmax_backward(grad, out, log: bool = False):
    """The softmax (``log``: log-softmax) backward over the last axis from the saved output ``out``:
    y (g - Σ g y), or g - exp(y) Σ g. One launch."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    grad, out = cupy.ascontiguousarray(grad), cupy.ascontiguousarray(out)
    n = out.shape[-1]
    dx = cupy.empty_like(out)
    rows = out.size // n if n else 0
    if rows:
        kernel = _row_kernel("softmax_backward<{t}, %s>" % ("true" if log else "false"), out.dtype)
        kernel((rows,), (_row_launch(n),), (grad, out, dx, np.int32(n)))
    return dx


def cross_entropy_forward(logits, targets, valid):
    """Per-row cross-entropy of CuPy ``logits`` (N, C) against int ``targets`` (N,) (in range),
    with ``valid`` (N,) bool: returns (losses (N,), 0 where not valid; row max m (N,);
    log Σ exp(logits - m) (N,)). One launch; no (N, C) buffer."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    logits = cupy.ascontiguousarray(logits)
    rows, n_classes = logits.shape
    losses, row_max, log_sum = (cupy.empty(rows, dtype=logits.dtype) for _ in range(3))
    if rows:
        kernel = _row_kernel("cross_entropy_forward<{t}>", logits.dtype)
        kernel((rows,), (_row_launch(n_classes),),
               (logits, cupy.ascontiguousarray(targets, dtype=cupy.int64), cupy.ascontiguousarray(valid),
                losses, row_max, log_sum, np.int32(n_classes)))
    return losses, row_max, log_sum


def cross_entropy_backward(logits, row_max, log_sum, targets, row_grad):
    """dlogits = row_grad[:, None] · (softmax(logits) - onehot(targets)) for CuPy ``logits`` (..., C)
    seen as N rows, softmax rebuilt as exp((logits - m) - log_sum). One launch, writing the only
    (N, C) array, returned in the shape of ``logits``."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    logits = cupy.ascontiguousarray(logits)
    n_classes = logits.shape[-1]
    rows = logits.size // n_classes
    grad = cupy.empty_like(logits)
    if rows:
        kernel = _row_kernel("cross_entropy_backward<{t}>", logits.dtype)
        kernel((rows,), (_row_launch(n_classes),),
               (logits, row_max, log_sum, cupy.ascontiguousarray(targets, dtype=cupy.int64),
                cupy.ascontiguousarray(row_grad, dtype=logits.dtype), grad, np.int32(n_classes)))
    return grad


def layer_norm_forward(x, weight, bias, eps: float):
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
        kernel = _row_kernel("layer_norm_forward<{t}>", x.dtype)
        kernel((rows,), (_row_launch(n),),
               (x, cupy.ascontiguousarray(weight), np.uintp(0) if bias is None else cupy.ascontiguousarray(bias),
                out, mean, rstd, np.int32(n), x.dtype.type(eps)))
    return out, mean, rstd


def layer_norm_backward(grad, x, weight, mean, rstd):
    """Layer norm backward: (dx, dweight, dbias). One kernel writes dx and per-block column
    sums of g·x̂ and g (a few rows per block, ~4 blocks per multiprocessor); one reduction adds
    those partial sums up. Two launches."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    x, grad = cupy.ascontiguousarray(x), cupy.ascontiguousarray(grad)
    n = x.shape[-1]
    rows = x.size // n if n else 0
    dx = cupy.empty_like(x)
    if rows == 0:
        zeros = cupy.zeros(n, dtype=x.dtype)
        return dx, zeros, zeros.copy()
    rows_per_block = -(-rows // (4 * _multiprocessor_count(x.device.id)))
    blocks = -(-rows // rows_per_block)
    partial = cupy.empty((2, blocks, n), dtype=x.dtype)
    kernel = _row_kernel("layer_norm_backward<{t}>", x.dtype)
    kernel((blocks,), (_row_launch(n),),
           (grad, x, cupy.ascontiguousarray(weight), mean, rstd, dx, partial,
            np.int32(rows), np.int32(n), np.int32(rows_per_block)))
    grad_weight, grad_bias = partial.sum(axis=1)
    return dx, grad_weight, grad_bias


_GELU_PREAMBLE = r"""
__device__ float normal_cdf(float x) { return normcdff(x); }
__device__ double normal_cdf(double x) { return normcdf(x); }
"""


@functools.lru_cache(maxsize=None)
def _gelu_kernel(approximate: str, direction: str):
    import cupy  # noqa: PLC0415

    k = "const T k = 0.7978845608028654, c = 0.044715;\n"   # √(2/π) and GELU's cubic coefficient
    bodies = {
        ("tanh", "forward"): k + "y = T(0.5) * x * (T(1) + tanh(k * x * (T(1) + c * x * x)));",
        ("tanh", "backward"): k + """
            const T x2 = x * x;
            const T t = tanh(k * x * (T(1) + c * x2));
            dx = g * (T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k * (T(1) + T(3) * c * x2));""",
        ("none", "forward"): "y = x * normal_cdf(x);",
        ("none", "backward"): "dx = g * (normal_cdf(x) + x * exp(T(-0.5) * x * x) * T(0.3989422804014327));",
    }
    params = ("T x", "T y") if direction == "forward" else ("T g, T x", "T dx")
    return cupy.ElementwiseKernel(*params, bodies[approximate, direction],
                                  f"minillm_gelu_{approximate}_{direction}", preamble=_GELU_PREAMBLE)


def gelu_forward(x, approximate: str):
    """GELU of a CuPy array in one elementwise kernel: x Φ(x), or GPT-2's tanh form."""
    return _gelu_kernel(approximate, "forward")(x)


def gelu_backward(grad, x, approximate: str):
    """dGELU/dx · grad in one elementwise kernel, recomputing tanh / Φ from x (nothing saved)."""
    return _gelu_kernel(approximate, "backward")(grad, x)


# ================================================================ optimizer: AdamW
#
# The whole AdamW update of one parameter in one launch: it reads p, g, m, v
# once and writes p, m, v once, where the array-module version makes a dozen
# passes. Used by minillm/optim/adamw.py for CuPy parameters.


@functools.lru_cache(maxsize=None)
def _adamw_kernel():
    import cupy  # noqa: PLC0415

    return cupy.ElementwiseKernel(
        "T grad, T beta1, T beta2, T step_size, T eps_hat, T decay",
        "T param, T exp_avg, T exp_avg_sq",
        """
        exp_avg = beta1 * exp_avg + ((T)1 - beta1) * grad;
        exp_avg_sq = beta2 * exp_avg_sq + ((T)1 - beta2) * grad * grad;
        param = decay * param - step_size * exp_avg / (sqrt(exp_avg_sq) + eps_hat);
        """,
        "minillm_adamw_update",
    )


def adamw_update_(param, grad, exp_avg, exp_avg_sq, beta1: float, beta2: float,
                  step_size: float, eps_hat: float, decay: float) -> None:
    """One AdamW step in place on CuPy arrays of one shape and dtype (bias corrections pre-folded):

        m <- beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g^2
        p <- decay p - step_size m / (sqrt(v) + eps_hat)

    with decay = 1 - lr wd, step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t) and
    eps_hat = eps sqrt(1 - beta2^t) (see minillm/optim/adamw.py). Equals the
    NumPy path of ``AdamW._update_cpu``.
    """
    scalar = param.dtype.type  # the scalars take the parameter's dtype: no float64 math for float32
    _adamw_kernel()(grad, scalar(beta1), scalar(beta2), scalar(step_size), scalar(eps_hat), scalar(decay),
                    param, exp_avg, exp_avg_sq)


# ================================================================ optimizer: multi-tensor norm and scale
#
# Gradient clipping touches every gradient twice (sum of squares, then scale).
# A model has ~150 gradient arrays, and one launch per array costs more than
# the arithmetic (GPT-2 small on an H200: ~6 ms launching vs ~0.2 ms reading).
# These kernels take all arrays in one launch: a table lists each array's
# pointer and size, and splits the arrays into chunks of CHUNK elements, one
# CUDA block per chunk. Used by minillm/optim/clip.py for CuPy gradients.

_MULTI_TENSOR_CHUNK = 1 << 16

_MULTI_TENSOR_SOURCE = r"""
// table (int64): [pointers (n_tensors) | sizes (n_tensors) | chunk's tensor (n_chunks) | chunk's start (n_chunks)]
template <typename T>
__device__ T* chunk_range(const long long* table, int n_tensors, int n_chunks, int chunk,
                          long long* begin, long long* end) {
    const long long tensor = table[2 * n_tensors + blockIdx.x];
    *begin = table[2 * n_tensors + n_chunks + blockIdx.x] + threadIdx.x;
    const long long stop = table[2 * n_tensors + n_chunks + blockIdx.x] + chunk;
    *end = stop < table[n_tensors + tensor] ? stop : table[n_tensors + tensor];
    return reinterpret_cast<T*>(table[tensor]);
}

// partials[block, thread] = sum of x^2 over the thread's elements of the block's chunk (summed later).
template <typename T>
__global__ void multi_sum_squares(const long long* table, int n_tensors, int n_chunks, int chunk, T* partials) {
    long long i, end;
    const T* x = chunk_range<T>(table, n_tensors, n_chunks, chunk, &i, &end);
    T sum = 0;
    for (; i < end; i += blockDim.x) sum += x[i] * x[i];
    partials[(long long)blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// x <- x * scale for every element of every array.
template <typename T>
__global__ void multi_scale(const long long* table, int n_tensors, int n_chunks, int chunk, T scale) {
    long long i, end;
    T* x = chunk_range<T>(table, n_tensors, n_chunks, chunk, &i, &end);
    for (; i < end; i += blockDim.x) x[i] *= scale;
}
"""

_MULTI_TENSOR_TYPES = {"float32": "float", "float64": "double"}
_MULTI_TENSOR_THREADS = 256


@functools.lru_cache(maxsize=None)
def _multi_tensor_module():
    import cupy  # noqa: PLC0415

    names = [f"{k}<{t}>" for t in _MULTI_TENSOR_TYPES.values() for k in ("multi_sum_squares", "multi_scale")]
    return cupy.RawModule(code=_MULTI_TENSOR_SOURCE, options=("--std=c++14",), name_expressions=names)


def multi_tensor_fusable(arrays) -> bool:
    """True when the arrays suit the multi-tensor kernels: CuPy, C-contiguous,
    one dtype (float32 or float64), one device."""
    import numpy as np  # noqa: PLC0415

    if not arrays or any(isinstance(a, np.ndarray) for a in arrays):
        return False
    first = arrays[0]
    return first.dtype.name in _MULTI_TENSOR_TYPES and all(
        a.flags.c_contiguous and a.dtype == first.dtype and a.device == first.device for a in arrays)


def _multi_tensor_launch(name: str, arrays, *args):
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    chunks = -(-sizes // _MULTI_TENSOR_CHUNK)  # per array
    n_chunks = int(chunks.sum())
    first_chunk = np.repeat(np.cumsum(chunks) - chunks, chunks)
    table = np.concatenate([
        np.array([a.data.ptr for a in arrays], dtype=np.uint64).view(np.int64), sizes,
        np.repeat(np.arange(len(arrays), dtype=np.int64), chunks),
        (np.arange(n_chunks, dtype=np.int64) - first_chunk) * _MULTI_TENSOR_CHUNK])
    kernel = _multi_tensor_module().get_function(f"{name}<{_MULTI_TENSOR_TYPES[arrays[0].dtype.name]}>")
    if n_chunks:
        kernel((n_chunks,), (_MULTI_TENSOR_THREADS,),
               (cupy.asarray(table), np.int32(len(arrays)), np.int32(n_chunks), np.int32(_MULTI_TENSOR_CHUNK), *args))
    return n_chunks


def multi_sum_squares(arrays):
    """Σ over all arrays of Σ x², as a 0-d CuPy array (no host sync): one launch
    for all arrays, then one sum over the per-thread partial sums. The arrays
    must pass :func:`multi_tensor_fusable`. Equals ``sum(xp.vdot(a, a) for a in arrays)``."""
    import cupy  # noqa: PLC0415

    sizes = [a.size for a in arrays]
    n_chunks = sum(-(-n // _MULTI_TENSOR_CHUNK) for n in sizes)
    partials = cupy.empty(n_chunks * _MULTI_TENSOR_THREADS, dtype=arrays[0].dtype)
    _multi_tensor_launch("multi_sum_squares", arrays, partials)
    return partials.sum()


def multi_scale_(arrays, scale: float) -> None:
    """x *= scale for every array, in place, in one launch (arrays as for
    :func:`multi_tensor_fusable`). Equals ``for a in arrays: a *= scale``."""
    _multi_tensor_launch("multi_scale", arrays, arrays[0].dtype.type(scale))
