"""CUDA kernels behind ops/loss.py: cross-entropy forward (row losses, no (N, C) buffer) and
backward (writes the only (N, C) array), one block per row. The logits' rows may lie further
apart than their length (a view of padded rows) and are read in place."""

from __future__ import annotations

from .common import ROW_HELPERS_SOURCE, fusable, row_kernel, row_launch  # noqa: F401 (fusable: re-exported)

_CROSS_ENTROPY_SOURCE = ROW_HELPERS_SOURCE + r"""
// Row n of z (rows, n_classes): m = max z_n, log_sum = log Σ exp(z_n - m) (logsumexp = m + log_sum,
// kept apart: their sum would round in float32 for large logits), loss = log_sum - (z_n[t_n] - m).
template <typename T>
__global__ void cross_entropy_forward(const T* z, const long long* targets, const bool* valid,
                                      T* losses, T* row_max, T* log_sum, int n_classes, long long ld) {
    __shared__ T scratch[64];
    const long long row = blockIdx.x;
    z += row * ld;                      // rows ld apart (ld >= n_classes: padded rows of a product)
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
                                       const T* row_grad, T* dz, int n_classes, long long ld) {
    const long long row = blockIdx.x;
    z += row * ld; dz += row * n_classes;
    const T m = row_max[row], log_s = log_sum[row], g = row_grad[row];
    const long long target = targets[row];
    for (int j = threadIdx.x; j < n_classes; j += blockDim.x)
        dz[j] = g * (exp((z[j] - m) - log_s) - (j == target ? T(1) : T(0)));
}
"""
_CROSS_ENTROPY_NAMES = ("cross_entropy_forward<{t}>", "cross_entropy_backward<{t}>")


def _kernel(name, dtype):
    return row_kernel(_CROSS_ENTROPY_SOURCE, _CROSS_ENTROPY_NAMES, name, dtype)


def _rows(logits):
    """(logits as (N, C) rows, the distance between rows in elements): a view when each row is
    contiguous (e.g. the padded rows of the LM head's product, ops/matmul.py), else a copy."""
    import cupy  # noqa: PLC0415

    z = logits.reshape(-1, logits.shape[-1])
    item = z.itemsize
    rows_contiguous = z.shape[1] <= 1 or z.strides[1] == item
    if not rows_contiguous or z.strides[0] % item or z.strides[0] < z.shape[1] * item:
        z = cupy.ascontiguousarray(z)
    return z, max(z.strides[0] // item, z.shape[1]) if z.shape[0] > 1 else z.shape[1]


def cross_entropy_forward(logits, targets, valid):
    """Per-row cross-entropy of CuPy ``logits`` (N, C) against int ``targets`` (N,) (in range),
    with ``valid`` (N,) bool: returns (losses (N,), 0 where not valid; row max m (N,);
    log Σ exp(logits - m) (N,)). One launch; no (N, C) buffer."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    logits, ld = _rows(logits)
    rows, n_classes = logits.shape
    losses, row_max, log_sum = (cupy.empty(rows, dtype=logits.dtype) for _ in range(3))
    if rows:
        kernel = _kernel("cross_entropy_forward<{t}>", logits.dtype)
        kernel((rows,), (row_launch(n_classes),),
               (logits, cupy.ascontiguousarray(targets, dtype=cupy.int64), cupy.ascontiguousarray(valid),
                losses, row_max, log_sum, np.int32(n_classes), np.int64(ld)))
    return losses, row_max, log_sum


def cross_entropy_backward(logits, row_max, log_sum, targets, row_grad):
    """dlogits = row_grad[:, None] · (softmax(logits) - onehot(targets)) for CuPy ``logits`` (..., C)
    seen as N rows, softmax rebuilt as exp((logits - m) - log_sum). One launch, writing the only
    (N, C) array, returned in the shape of ``logits``."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    shape = logits.shape
    logits, ld = _rows(logits)
    rows, n_classes = logits.shape
    grad = cupy.empty(shape, dtype=logits.dtype)                     # contiguous, whatever logits' rows
    if rows:
        kernel = _kernel("cross_entropy_backward<{t}>", logits.dtype)
        kernel((rows,), (row_launch(n_classes),),
               (logits, row_max, log_sum, cupy.ascontiguousarray(targets, dtype=cupy.int64),
                cupy.ascontiguousarray(row_grad, dtype=logits.dtype), grad, np.int32(n_classes), np.int64(ld)))
    return grad
