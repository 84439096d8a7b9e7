"""CUDA kernels behind minillm/optim: the fused AdamW update and the multi-tensor norm and scale."""

from __future__ import annotations

import functools

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
