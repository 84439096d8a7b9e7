"""CUDA kernels behind ops/attention.py.

Row-wise kernels over the (…, Tq, Tk) attention matrix, one CUDA block per
row (query), so the causal mask, the max, the sum and the normalisation of a
row are one launch instead of five, and the masked half of a causal row is
never read. Query i of Tq attends keys j <= i + causal_offset (offset =
Tk - Tq: the queries are the last Tq positions); with ``causal`` off every
query attends every key.
"""

from __future__ import annotations

import functools

from .common import row_launch

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
    kernel((rows,), (row_launch(tk),), (scores, np.int32(tq), np.int32(tk), np.int32(causal), np.int32(tk - tq)))
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
    kernel((rows,), (row_launch(tk),),
           (grad_probs, probs, keep if keep is not None else np.uintp(0), accumulate(keep_scale),
            np.int32(tq), np.int32(tk), np.int32(causal), np.int32(tk - tq)))
    return grad_probs
