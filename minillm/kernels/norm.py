"""CUDA kernels behind ops/norm.py: layer norm forward (one block per row) and backward (dx
plus per-block column sums for dw, db, then one reduction)."""

from __future__ import annotations

from .common import ROW_HELPERS_SOURCE, fusable, multiprocessor_count, row_kernel, row_launch  # noqa: F401 (fusable: re-exported)

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
        kernel = _kernel("layer_norm_forward<{t}>", x.dtype)
        kernel((rows,), (row_launch(n),),
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
    rows_per_block = -(-rows // (4 * multiprocessor_count(x.device.id)))
    blocks = -(-rows // rows_per_block)
    partial = cupy.empty((2, blocks, n), dtype=x.dtype)
    kernel = _kernel("layer_norm_backward<{t}>", x.dtype)
    kernel((blocks,), (row_launch(n),),
           (grad, x, cupy.ascontiguousarray(weight), mean, rstd, dx, partial,
            np.int32(rows), np.int32(n), np.int32(rows_per_block)))
    grad_weight, grad_bias = partial.sum(axis=1)
    return dx, grad_weight, grad_bias
