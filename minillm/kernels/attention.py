"""CUDA kernels behind ops/attention.py, in three parts:

1. Row kernels over the (…, Tq, Tk) attention matrix, one CUDA block per row
   (query), so the causal mask, the max, the sum and the normalisation of a row
   are one launch instead of five, and the masked half of a causal row is never
   read. Query i of Tq attends keys j <= i + causal_offset (offset = Tk - Tq: the
   queries are the last Tq positions); with ``causal`` off every query attends
   every key.
2. Flash attention: a fused tiled forward and a two-kernel backward that never
   form the score matrix (O(T) memory).
3. The score-matrix path: cuBLAS products (kernels/matmul.py) around the row
   kernels, with causal queries in blocks.
4. The same two row kernels for the CPU, as C++ row loops (kernels/cpu.py
   compiles them), run on the tiles of ops/attention.py's CPU path.
"""

from __future__ import annotations

import ctypes
import functools
import math

import numpy as np

from . import cpu
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


# ================================================================ flash attention
#
# One fused kernel for the forward pass and two for the backward, in the manner
# of FlashAttention-2 (Dao, 2023), written for clarity on the CUDA cores (SIMT,
# no tensor cores): every float is accumulated in float32 (float64 for float64
# inputs), whatever the input dtype (float32, float64, float16, bf16).
#
# Forward: a block of FLASH_THREADS threads owns FLASH_THREADS query rows of one
# head, one row per thread (q row and output accumulator in registers). It walks
# the keys in tiles of BN rows staged in shared memory and keeps, per row, the
# running max m and sum l of exp(s - m) ("online softmax"): a chunk of 16 keys
# with max m' > m rescales l and the accumulator by exp(m - m') once. The T×T
# score matrix is never formed; the output is acc / l, and the row's log-sum-exp
# lse = m + log l is all that backward needs (O(T) memory). Causal blocks stop
# at the last key their last query may see.
#
# Backward, with P_ij = exp(s_ij - lse_i) recomputed tile by tile and
# Δ_i = Σ_c dO_ic O_ic (= Σ_j P_ij dP_ij):
#   dQ kernel   one thread per query row:   dQ_i = scale Σ_j dS_ij K_j
#   dKV kernel  one thread per key row:     dV_j = Σ_i P_ij dO_i,  dK_j = scale Σ_i dS_ij Q_i
# with dP_ij = dO_i · V_j and dS_ij = P_ij (dP_ij − Δ_i). Each thread owns its
# output row, so there are no atomics and the result is deterministic. For
# grouped-query attention the dKV thread also sums over the G query heads that
# share its key/value head. docs/autograd.md derives these lines.

_FLASH_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename A> __device__ __forceinline__ A minus_inf();
template <> __device__ __forceinline__ float minus_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double minus_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

#define CHUNK 16

// Keys j0 .. j0 + BN - 1 of one head's K and V into shared memory as A, zeros past tk and past
// d / dv: the key tile that the forward's and dQ's THREADS threads copy together.
template <typename T, typename A, int D, int BN, int THREADS>
__device__ __forceinline__ void load_key_tile(A (&k_tile)[BN][D], A (&v_tile)[BN][D], const T* k_head,
                                              const T* v_head, int j0, int tk, int d, int dv) {
    for (int e = threadIdx.x; e < BN * D; e += THREADS) {
        const int r = e / D, c = e % D, j = j0 + r;
        k_tile[r][c] = (j < tk && c < d) ? to_acc(k_head[(long long)j * d + c]) : A(0);
        v_tile[r][c] = (j < tk && c < dv) ? to_acc(v_head[(long long)j * dv + c]) : A(0);
    }
}

// q (NQ, tq, d), k (NQ/group, tk, d), v (NQ/group, tk, dv) of T; o (NQ, tq, dv), lse (NQ, tq) of A.
// Grid (ceil(tq / BM), NQ); BM threads, one query row each; BN keys per shared-memory tile.
template <typename T, typename A, int D, int BM, int BN>
__global__ void __launch_bounds__(BM) flash_forward(
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
        A* __restrict__ o, A* __restrict__ lse, int tq, int tk, int d, int dv, int group, int causal, A scale) {
    __shared__ A k_tile[BN][D];
    __shared__ A v_tile[BN][D];
    const long long n = blockIdx.y, kv = n / group;
    const int row0 = blockIdx.x * BM, i = row0 + threadIdx.x, offset = tk - tq;
    const bool active = i < tq;
    const T* k_head = k + kv * tk * d;
    const T* v_head = v + kv * tk * dv;
    A q_row[D], acc[D];
#pragma unroll
    for (int c = 0; c < D; ++c) {
        q_row[c] = (active && c < d) ? to_acc(q[(n * tq + i) * d + c]) * scale : A(0);
        acc[c] = A(0);
    }
    const int last = !active ? -1 : (causal ? i + offset : tk - 1);          // this row's last key
    const int k_end = causal ? min(tk, min(row0 + BM, tq) - 1 + offset + 1) : tk;
    A m = minus_inf<A>(), l = A(0);
    for (int j0 = 0; j0 < k_end; j0 += BN) {
        __syncthreads();
        load_key_tile<T, A, D, BN, BM>(k_tile, v_tile, k_head, v_head, j0, tk, d, dv);
        __syncthreads();
        for (int jc = 0; jc < BN; jc += CHUNK) {
            if (j0 + jc > last) break;                  // keys j0 + jc <= last: at least one visible
            A s[CHUNK];
            A chunk_max = minus_inf<A>();
#pragma unroll
            for (int u = 0; u < CHUNK; ++u) {
                A dot = A(0);
#pragma unroll
                for (int c = 0; c < D; ++c) dot += q_row[c] * k_tile[jc + u][c];
                s[u] = (j0 + jc + u <= last) ? dot : minus_inf<A>();
                chunk_max = s[u] > chunk_max ? s[u] : chunk_max;
            }
            const A m_new = m > chunk_max ? m : chunk_max;
            const A correction = exp(m - m_new);        // 0 on the first chunk (m = -inf)
            l *= correction;
#pragma unroll
            for (int c = 0; c < D; ++c) acc[c] *= correction;
#pragma unroll
            for (int u = 0; u < CHUNK; ++u) {
                const A p = exp(s[u] - m_new);
                l += p;
#pragma unroll
                for (int c = 0; c < D; ++c) acc[c] += p * v_tile[jc + u][c];
            }
            m = m_new;
        }
    }
    if (active) {
        const A inv = A(1) / l;
#pragma unroll
        for (int c = 0; c < D; ++c)
            if (c < dv) o[(n * tq + i) * dv + c] = acc[c] * inv;
        lse[n * tq + i] = m + log(l);
    }
}

// dQ: grid (ceil(tq / BM), NQ), one thread per query row, key tiles of BN rows in shared memory.
template <typename T, typename A, int D, int BM, int BN>
__global__ void __launch_bounds__(BM) flash_backward_dq(
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
        const A* __restrict__ grad_out, const A* __restrict__ lse, const A* __restrict__ delta,
        A* __restrict__ grad_q, int tq, int tk, int d, int dv, int group, int causal, A scale) {
    __shared__ A k_tile[BN][D];
    __shared__ A v_tile[BN][D];
    const long long n = blockIdx.y, kv = n / group;
    const int row0 = blockIdx.x * BM, i = row0 + threadIdx.x, offset = tk - tq;
    const bool active = i < tq;
    const T* k_head = k + kv * tk * d;
    const T* v_head = v + kv * tk * dv;
    A q_row[D], g_row[D], dq[D];
#pragma unroll
    for (int c = 0; c < D; ++c) {
        q_row[c] = (active && c < d) ? to_acc(q[(n * tq + i) * d + c]) * scale : A(0);
        g_row[c] = (active && c < dv) ? grad_out[(n * tq + i) * dv + c] : A(0);
        dq[c] = A(0);
    }
    const A row_lse = active ? lse[n * tq + i] : A(0);
    const A row_delta = active ? delta[n * tq + i] : A(0);
    const int last = !active ? -1 : (causal ? i + offset : tk - 1);
    const int k_end = causal ? min(tk, min(row0 + BM, tq) - 1 + offset + 1) : tk;
    for (int j0 = 0; j0 < k_end; j0 += BN) {
        __syncthreads();
        load_key_tile<T, A, D, BN, BM>(k_tile, v_tile, k_head, v_head, j0, tk, d, dv);
        __syncthreads();
        for (int u = 0; u < BN; ++u) {
            if (j0 + u > last) break;
            A s = A(0), dp = A(0);
#pragma unroll
            for (int c = 0; c < D; ++c) { s += q_row[c] * k_tile[u][c]; dp += g_row[c] * v_tile[u][c]; }
            const A ds = exp(s - row_lse) * (dp - row_delta);          // dS = P (dP - Δ)
#pragma unroll
            for (int c = 0; c < D; ++c) dq[c] += ds * k_tile[u][c];
        }
    }
    if (active) {
#pragma unroll
        for (int c = 0; c < D; ++c)
            if (c < d) grad_q[(n * tq + i) * d + c] = dq[c] * scale;
    }
}

// dK, dV: grid (ceil(tk / BN), NK), one thread per key row; query tiles of BM rows in shared memory,
// for each of the group's query heads in turn.
template <typename T, typename A, int D, int BM, int BN>
__global__ void __launch_bounds__(BN) flash_backward_dkv(
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
        const A* __restrict__ grad_out, const A* __restrict__ lse, const A* __restrict__ delta,
        A* __restrict__ grad_k, A* __restrict__ grad_v, int tq, int tk, int d, int dv, int group, int causal,
        A scale) {
    __shared__ A q_tile[BM][D];
    __shared__ A g_tile[BM][D];
    __shared__ A lse_tile[BM];
    __shared__ A delta_tile[BM];
    const long long kv = blockIdx.y;
    const int key0 = blockIdx.x * BN, j = key0 + threadIdx.x, offset = tk - tq;
    const bool active = j < tk;
    A k_row[D], v_row[D], dk[D], dv_row[D];
#pragma unroll
    for (int c = 0; c < D; ++c) {
        k_row[c] = (active && c < d) ? to_acc(k[(kv * tk + j) * d + c]) : A(0);
        v_row[c] = (active && c < dv) ? to_acc(v[(kv * tk + j) * dv + c]) : A(0);
        dk[c] = A(0);
        dv_row[c] = A(0);
    }
    // causal: query i sees key j when i + offset >= j
    const int first = !active ? tq : (causal ? max(0, j - offset) : 0);      // this key's first query
    const int block_first = causal ? max(0, key0 - offset) : 0;
    for (int g = 0; g < group; ++g) {
        const long long n = kv * group + g;
        for (int i0 = (block_first / BM) * BM; i0 < tq; i0 += BM) {
            __syncthreads();
            for (int e = threadIdx.x; e < BM * D; e += BN) {
                const int r = e / D, c = e % D, i = i0 + r;
                q_tile[r][c] = (i < tq && c < d) ? to_acc(q[(n * tq + i) * d + c]) * scale : A(0);
                g_tile[r][c] = (i < tq && c < dv) ? grad_out[(n * tq + i) * dv + c] : A(0);
            }
            for (int r = threadIdx.x; r < BM; r += BN) {
                const int i = i0 + r;
                lse_tile[r] = i < tq ? lse[n * tq + i] : A(0);
                delta_tile[r] = i < tq ? delta[n * tq + i] : A(0);
            }
            __syncthreads();
            for (int r = 0; r < BM; ++r) {
                const int i = i0 + r;
                if (i < first || i >= tq) continue;
                A s = A(0), dp = A(0);
#pragma unroll
                for (int c = 0; c < D; ++c) { s += q_tile[r][c] * k_row[c]; dp += g_tile[r][c] * v_row[c]; }
                const A p = exp(s - lse_tile[r]);
                const A ds = p * (dp - delta_tile[r]);
#pragma unroll
                for (int c = 0; c < D; ++c) { dv_row[c] += p * g_tile[r][c]; dk[c] += ds * q_tile[r][c]; }
            }
        }
    }
    if (active) {
#pragma unroll
        for (int c = 0; c < D; ++c) {
            if (c < d) grad_k[(kv * tk + j) * d + c] = dk[c];
            if (c < dv) grad_v[(kv * tk + j) * dv + c] = dv_row[c];
        }
    }
}
"""

# input dtype -> (C type, accumulator C type); float16/bf16 accumulate (and return) float32
_FLASH_TYPES = {"float32": ("float", "float"), "float64": ("double", "double"),
                "float16": ("__half", "float"), "bfloat16": ("__nv_bfloat16", "float")}
_FLASH_DIMS = (16, 32, 64, 128)          # head dims are padded up to one of these (registers)
FLASH_THREADS = 64                        # query rows (forward, dQ) or key rows (dK, dV) per block


def _flash_tile(dim: int, acc_itemsize: int) -> int:
    """Rows per shared-memory tile: two (rows, dim) tiles within 32 KB, at most 64, a multiple of 16."""
    return min(64, 16384 // (dim * acc_itemsize))


def flash_supported(q, k, v) -> bool:
    """True when the flash kernels take these CuPy arrays: a supported dtype, head dims <= 128."""
    return (q.dtype.name in _FLASH_TYPES and q.dtype == k.dtype == v.dtype
            and max(q.shape[-1], v.shape[-1]) <= _FLASH_DIMS[-1] and k.shape[-2] > 0)


def _flash_instance(kind: str, dtype, dim: int):
    """(kernel, padded head dim, query-tile rows, key-tile rows, accumulator dtype) for one kernel."""
    import numpy as np  # noqa: PLC0415

    from .common import compile_module  # noqa: PLC0415

    t, a = _FLASH_TYPES[dtype.name]
    acc = np.dtype(np.float64 if a == "double" else np.float32)
    padded = next(p for p in _FLASH_DIMS if p >= dim)
    tile = _flash_tile(padded, acc.itemsize)
    bm, bn = (tile, FLASH_THREADS) if kind == "backward_dkv" else (FLASH_THREADS, tile)
    name = f"flash_{kind}<{t}, {a}, {padded}, {bm}, {bn}>"
    kernel = compile_module(_FLASH_SOURCE, (name,), ("--std=c++14",)).get_function(name)
    return kernel, bm, bn, acc


def _flash_args(q, k, v):
    import numpy as np  # noqa: PLC0415

    nq, tq, d = q.shape
    nk, tk, dv = v.shape
    return nq, nk, tq, tk, d, dv, np.int32(nq // nk)


def flash_attention_forward(q, k, v, causal: bool, scale: float):
    """softmax(mask(scale · Q Kᵀ)) V without the score matrix.

    q (NQ, Tq, D), k (NK, Tk, D), v (NK, Tk, Dv): C-contiguous CuPy arrays of one dtype,
    NQ = NK · G (query head n uses key/value head n // G). Returns (out (NQ, Tq, Dv),
    lse (NQ, Tq)) in the accumulator dtype (float32; float64 for float64 inputs).
    """
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    if flash_tc_eligible(q, k, v, q.dtype):                  # bf16/fp16, D = 32 or 64: the tensor cores
        return _flash_tc_forward(q, k, v, causal, scale)
    q, k, v = (cupy.ascontiguousarray(a) for a in (q, k, v))
    nq, nk, tq, tk, d, dv, group = _flash_args(q, k, v)
    kernel, bm, _, acc = _flash_instance("forward", q.dtype, max(d, dv))
    out = cupy.empty((nq, tq, dv), dtype=acc)
    lse = cupy.empty((nq, tq), dtype=acc)
    if nq and tq:
        kernel(((tq + bm - 1) // bm, nq), (bm,),
               (q, k, v, out, lse, np.int32(tq), np.int32(tk), np.int32(d), np.int32(dv), group,
                np.int32(causal), acc.type(scale)))
    return out, lse


def flash_attention_backward(q, k, v, out, lse, grad_out, causal: bool, scale: float):
    """(dQ, dK, dV) of :func:`flash_attention_forward` given dO (NQ, Tq, Dv), recomputing P
    tile by tile from Q, K and lse. Gradients in the accumulator dtype."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    if flash_tc_eligible(q, k, v, q.dtype):
        return _flash_tc_backward(q, k, v, out, lse, grad_out, causal, scale)
    q, k, v = (cupy.ascontiguousarray(a) for a in (q, k, v))
    grad_out = cupy.ascontiguousarray(grad_out, dtype=out.dtype)
    nq, nk, tq, tk, d, dv, group = _flash_args(q, k, v)
    delta = cupy.sum(grad_out * out, axis=-1)                          # Δ_i = Σ_c dO_ic O_ic  (NQ, Tq)
    dq_kernel, bm, _, acc = _flash_instance("backward_dq", q.dtype, max(d, dv))
    dkv_kernel, _, bn, _ = _flash_instance("backward_dkv", q.dtype, max(d, dv))
    grad_q = cupy.empty((nq, tq, d), dtype=acc)
    grad_k = cupy.empty((nk, tk, d), dtype=acc)
    grad_v = cupy.empty((nk, tk, dv), dtype=acc)
    sizes = (np.int32(tq), np.int32(tk), np.int32(d), np.int32(dv), group, np.int32(causal), acc.type(scale))
    if nq and tq:
        dq_kernel(((tq + bm - 1) // bm, nq), (bm,), (q, k, v, grad_out, lse, delta, grad_q) + sizes)
        dkv_kernel(((tk + bn - 1) // bn, nk), (bn,), (q, k, v, grad_out, lse, delta, grad_k, grad_v) + sizes)
    else:
        grad_k.fill(0)
        grad_v.fill(0)
    return grad_q, grad_k, grad_v


# ================================================================ flash attention on the tensor cores
#
# The same algorithm as the kernels above (online softmax forward; backward from P recomputed with
# lse, a dQ kernel over key tiles and a dK/dV kernel over query tiles), for bf16/fp16 inputs with
# head size D = 32 or 64, where the products run on the tensor cores: a warp multiplies 16×16 by
# 16×8 pieces of bf16/fp16 with one mma.sync instruction each and accumulates them in float32
# (inline PTX; which lane holds which piece is laid out below, as the PTX ISA defines it). The
# softmax statistics (max, Σ exp, lse, Δ) and everything elementwise stay float32.
#
# A block has 4 warps; each owns 16 rows (query rows in the forward and dQ kernels, key rows in the
# dK/dV kernel), loaded once into registers as the left operand of its products. The other side
# (K and V, or Q and dO) comes through shared memory in tiles of 64 rows. A product's result
# stays in registers, where the softmax (or its backward) works on it, and is handed straight on
# as the left operand of the next product, rounded to bf16/fp16: the score matrix never leaves the
# registers, as in FlashAttention-2 (Dao, 2023). Shared memory: two 64-row tiles per block.
_FLASH_TC_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define TC_THREADS 128
#define TC_NEG_INF __int_as_float(0xff800000)

template <typename T> __device__ __forceinline__ T tc_cast(float x);
template <> __device__ __forceinline__ __half tc_cast<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 tc_cast<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// One tensor-core instruction, mma.sync m16n8k16: C (16 × 8, float32) += A (16 × 16) · B (16 × 8) of
// bf16 or fp16, for the whole warp. Each lane holds pieces of A, B, C at places the PTX ISA fixes
// ("matrix fragments for mma.m16n8k16"); with g = lane / 4 and t = lane % 4:
//   A: a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B: b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   C: c[0], c[1] = C[g][2t, 2t+1]    c[2], c[3] = C[g+8][2t, 2t+1]
// (two 16-bit values per 32-bit register, the first in the low half). A lane thus holds two rows
// (g and g+8) of every C block, and C blocks 2kk and 2kk+1 side by side are exactly the A fragment
// of columns 16kk..16kk+15: scores computed as C feed the next product as A without leaving the
// registers (as in FlashAttention-2).
template <typename T> __device__ __forceinline__ void tc_mma(float* c, const unsigned* a, const unsigned* b);
template <> __device__ __forceinline__ void tc_mma<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void tc_mma<__half>(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T> __device__ __forceinline__ unsigned tc_bits(T x) {
    return (unsigned)*reinterpret_cast<const unsigned short*>(&x);
}
template <typename T> __device__ __forceinline__ unsigned tc_pack(T low, T high) {
    return tc_bits(low) | (tc_bits(high) << 16);
}
template <typename T> __device__ __forceinline__ unsigned tc_pack_floats(float low, float high) {
    return tc_pack(tc_cast<T>(low), tc_cast<T>(high));
}
template <typename T> __device__ __forceinline__ unsigned tc_pair(const T* p) {      // p[0], p[1] adjacent
    return *reinterpret_cast<const unsigned*>(p);
}

// The A fragments (16 rows × D, as D/16 fragments) of rows r0..r0+15 of a (n_rows, D) row-major
// matrix in global memory; rows past n_rows are zeros.
template <typename T, int D>
__device__ __forceinline__ void tc_rows_as_a(unsigned (*a)[4], const T* m, int r0, int n_rows) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const bool top = r0 + g < n_rows, bottom = r0 + g + 8 < n_rows;
    const T* row_top = m + (long long)(r0 + g) * D;
    const T* row_bottom = row_top + 8 * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int c = kk * 16 + 2 * t;
        a[kk][0] = top ? tc_pair(row_top + c) : 0u;
        a[kk][1] = bottom ? tc_pair(row_bottom + c) : 0u;
        a[kk][2] = top ? tc_pair(row_top + c + 8) : 0u;
        a[kk][3] = bottom ? tc_pair(row_bottom + c + 8) : 0u;
    }
}

// B fragment (k0.., n0..) of B = bᵀ where b is a row-major tile (N × K, leading dimension LD): B[k][n] = b[n][k].
template <typename T, int LD> __device__ __forceinline__ void tc_bt(unsigned* b, const T* m, int k0, int n0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    b[0] = tc_pair(m + (n0 + g) * LD + k0 + 2 * t);
    b[1] = tc_pair(m + (n0 + g) * LD + k0 + 2 * t + 8);
}

// B fragment (k0.., n0..) of a row-major tile B (K × N, leading dimension LD).
template <typename T, int LD> __device__ __forceinline__ void tc_b(unsigned* b, const T* m, int k0, int n0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const T* col = m + n0 + g;
    b[0] = tc_pack(col[(k0 + 2 * t) * LD], col[(k0 + 2 * t + 1) * LD]);
    b[1] = tc_pack(col[(k0 + 2 * t + 8) * LD], col[(k0 + 2 * t + 9) * LD]);
}

// C (16 × N, N/8 blocks) = A (16 × K, K/16 fragments) · tileᵀ (tile: N rows × K, row-major, LD).
template <typename T, int K, int N, int LD>
__device__ __forceinline__ void tc_times_transposed(float (*c)[4], const unsigned (*a)[4], const T* tile) {
#pragma unroll
    for (int nb = 0; nb < N / 8; ++nb) c[nb][0] = c[nb][1] = c[nb][2] = c[nb][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
#pragma unroll
        for (int nb = 0; nb < N / 8; ++nb) {
            unsigned b[2];
            tc_bt<T, LD>(b, tile, kk * 16, nb * 8);
            tc_mma<T>(c[nb], a[kk], b);
        }
}

// acc (16 × D, D/8 blocks) += P (16 × K, held as K/8 C blocks, rounded to T here) · tile (K × D, row-major, LD).
template <typename T, int K, int D, int LD>
__device__ __forceinline__ void tc_accumulate(float (*acc)[4], const float (*p)[4], const T* tile) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        const unsigned a[4] = {tc_pack_floats<T>(p[2 * kk][0], p[2 * kk][1]), tc_pack_floats<T>(p[2 * kk][2], p[2 * kk][3]),
                               tc_pack_floats<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               tc_pack_floats<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
            unsigned b[2];
            tc_b<T, LD>(b, tile, kk * 16, c * 8);
            tc_mma<T>(acc[c], a, b);
        }
    }
}

// rows [r0, r0 + R) of a (n_rows, D) row-major matrix into tile (R × LD); rows past n_rows are zeros.
// 16-byte loads: D is a multiple of 8 two-byte elements, and every row starts 16-byte aligned.
// (Rows are LD = D + 8 long in shared memory: the fragment reads of 8 rows then fall in 8 different
// groups of banks instead of one.)
template <typename T, int R, int D, int LD>
__device__ __forceinline__ void tc_load(T* tile, const T* __restrict__ src, int r0, int n_rows) {
    constexpr int PER_ROW = D / 8;
    for (int e = threadIdx.x; e < R * PER_ROW; e += TC_THREADS) {
        const int r = e / PER_ROW, c = (e % PER_ROW) * 8;
        uint4 value = make_uint4(0, 0, 0, 0);
        if (r0 + r < n_rows) value = *reinterpret_cast<const uint4*>(src + (long long)(r0 + r) * D + c);
        *reinterpret_cast<uint4*>(tile + r * LD + c) = value;
    }
}

// Sum over the 4 lanes that hold one row of a C block (lanes 4g .. 4g+3), and the same for max.
__device__ __forceinline__ float tc_row_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float tc_row_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Forward. q (NQ, tq, D), k, v (NQ/group, tk, D) of T; o (NQ, tq, D), lse (NQ, tq) float32.
// Grid (ceil(tq / 64), NQ), 128 threads: warp w owns query rows 16w..16w+15 of the block's 64, a
// lane two of them (g and g+8); key tiles of 64 in shared memory. Per tile: S = Q Kᵀ, the online
// softmax on S in registers, O += P V.
template <typename T, int D>
__global__ void __launch_bounds__(TC_THREADS) flash_tc_forward(
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
        float* __restrict__ o, float* __restrict__ lse, int tq, int tk, int group, int causal, float scale) {
    constexpr int BM = 64, BN = 64, LD = D + 8;
    __shared__ __align__(16) T k_s[BN * LD];
    __shared__ __align__(16) T v_s[BN * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long n = blockIdx.y, kv = n / group;
    const int row0 = blockIdx.x * BM, offset = tk - tq;
    const int rows[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
    const int last[2] = {causal ? rows[0] + offset : tk - 1, causal ? rows[1] + offset : tk - 1};
    unsigned qa[D / 16][4];
    tc_rows_as_a<T, D>(qa, q + n * tq * D, row0 + warp * 16, tq);
    float acc[D / 8][4];
#pragma unroll
    for (int c = 0; c < D / 8; ++c) acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.0f;
    float m[2] = {TC_NEG_INF, TC_NEG_INF}, l[2] = {0.0f, 0.0f};
    const int k_end = causal ? min(tk, min(row0 + BM, tq) + offset) : tk;       // the block's key range
    for (int j0 = 0; j0 < k_end; j0 += BN) {
        __syncthreads();                                  // the previous tile is no longer read
        tc_load<T, BN, D, LD>(k_s, k + kv * tk * D, j0, tk);
        tc_load<T, BN, D, LD>(v_s, v + kv * tk * D, j0, tk);
        __syncthreads();
        float s[BN / 8][4];
        tc_times_transposed<T, D, BN, LD>(s, qa, k_s);                           // S = Q Kᵀ
        float tile_max[2] = {TC_NEG_INF, TC_NEG_INF};
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + nb * 8 + 2 * t + (e & 1), h = e >> 1;
                s[nb][e] = (j <= last[h] && j < tk) ? s[nb][e] * scale : TC_NEG_INF;
                tile_max[h] = fmaxf(tile_max[h], s[nb][e]);
            }
        float correction[2], m_new[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            m_new[h] = fmaxf(m[h], tc_row_max(tile_max[h]));
            correction[h] = m_new[h] == TC_NEG_INF ? 1.0f : expf(m[h] - m_new[h]);   // 0 on the first visible tile
        }
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int h = e >> 1;
                s[nb][e] = m_new[h] == TC_NEG_INF ? 0.0f : expf(s[nb][e] - m_new[h]);   // P (unnormalised)
                sum[h] += s[nb][e];
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            l[h] = l[h] * correction[h] + tc_row_sum(sum[h]);
            m[h] = m_new[h];
        }
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
            acc[c][0] *= correction[0]; acc[c][1] *= correction[0];
            acc[c][2] *= correction[1]; acc[c][3] *= correction[1];
        }
        tc_accumulate<T, BN, D, LD>(acc, s, v_s);                                 // O += P V
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (rows[h] >= tq) continue;
        const float inv = 1.0f / l[h];
        float* out = o + (n * tq + rows[h]) * D + 2 * t;
#pragma unroll
        for (int c = 0; c < D / 8; ++c)
            *reinterpret_cast<float2*>(out + c * 8) = make_float2(acc[c][2 * h] * inv, acc[c][2 * h + 1] * inv);
        if (t == 0) lse[n * tq + rows[h]] = m[h] + logf(l[h]);
    }
}

// dQ. q (NQ, tq, D), k, v (NK, tk, D), grad_out (NQ, tq, D) of T; lse, delta (NQ, tq) float;
// grad_q (NQ, tq, D) float. Grid (ceil(tq / 64), NQ), 128 threads as in the forward; key tiles of 64.
// dS = P (dP - Δ) with P = exp(scale q·k - lse), dP = dO·v;  dQ = scale Σ_j dS_j k_j.
template <typename T, int D>
__global__ void __launch_bounds__(TC_THREADS) flash_tc_backward_dq(
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ grad_out,
        const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ grad_q,
        int tq, int tk, int group, int causal, float scale) {
    constexpr int BM = 64, BN = 64, LD = D + 8;
    __shared__ __align__(16) T k_s[BN * LD];
    __shared__ __align__(16) T v_s[BN * LD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long n = blockIdx.y, kv = n / group;
    const int row0 = blockIdx.x * BM, offset = tk - tq;
    const int rows[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
    const int last[2] = {causal ? rows[0] + offset : tk - 1, causal ? rows[1] + offset : tk - 1};
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        row_lse[h] = rows[h] < tq ? lse[n * tq + rows[h]] : 0.0f;
        row_delta[h] = rows[h] < tq ? delta[n * tq + rows[h]] : 0.0f;
    }
    unsigned qa[D / 16][4], ga[D / 16][4];
    tc_rows_as_a<T, D>(qa, q + n * tq * D, row0 + warp * 16, tq);
    tc_rows_as_a<T, D>(ga, grad_out + n * tq * D, row0 + warp * 16, tq);
    float dq[D / 8][4];
#pragma unroll
    for (int c = 0; c < D / 8; ++c) dq[c][0] = dq[c][1] = dq[c][2] = dq[c][3] = 0.0f;
    const int k_end = causal ? min(tk, min(row0 + BM, tq) + offset) : tk;
    for (int j0 = 0; j0 < k_end; j0 += BN) {
        __syncthreads();
        tc_load<T, BN, D, LD>(k_s, k + kv * tk * D, j0, tk);
        tc_load<T, BN, D, LD>(v_s, v + kv * tk * D, j0, tk);
        __syncthreads();
        float s[BN / 8][4], dp[BN / 8][4];
        tc_times_transposed<T, D, BN, LD>(s, qa, k_s);                           // S = Q Kᵀ
        tc_times_transposed<T, D, BN, LD>(dp, ga, v_s);                          // dP = dO Vᵀ
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = j0 + nb * 8 + 2 * t + (e & 1), h = e >> 1;
                const bool visible = rows[h] < tq && j <= last[h] && j < tk;
                const float p = visible ? expf(s[nb][e] * scale - row_lse[h]) : 0.0f;
                s[nb][e] = p * (dp[nb][e] - row_delta[h]) * scale;              // scale · dS
            }
        tc_accumulate<T, BN, D, LD>(dq, s, k_s);                                 // dQ += scale dS K
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (rows[h] >= tq) continue;
        float* out = grad_q + (n * tq + rows[h]) * D + 2 * t;
#pragma unroll
        for (int c = 0; c < D / 8; ++c) *reinterpret_cast<float2*>(out + c * 8) = make_float2(dq[c][2 * h], dq[c][2 * h + 1]);
    }
}

// dK, dV. Grid (ceil(tk / 64), NK), 128 threads: warp w owns key rows 16w..16w+15 of the block's 64;
// query tiles of 64 of each of the group's query heads in turn. With Sᵀ = K Qᵀ and dPᵀ = V dOᵀ in
// registers:  dV += Pᵀ dO,  dK += scale dSᵀ Q.
template <typename T, int D>
__global__ void __launch_bounds__(TC_THREADS) flash_tc_backward_dkv(
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ grad_out,
        const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ grad_k,
        float* __restrict__ grad_v, int tq, int tk, int group, int causal, float scale) {
    constexpr int BN = 64, BM = 64, LD = D + 8;
    __shared__ __align__(16) T q_s[BM * LD];
    __shared__ __align__(16) T g_s[BM * LD];
    __shared__ float lse_s[BM], delta_s[BM];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long kv = blockIdx.y;
    const int key0 = blockIdx.x * BN, offset = tk - tq;
    const int keys[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
    unsigned ka[D / 16][4], va[D / 16][4];
    tc_rows_as_a<T, D>(ka, k + kv * tk * D, key0 + warp * 16, tk);
    tc_rows_as_a<T, D>(va, v + kv * tk * D, key0 + warp * 16, tk);
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int c = 0; c < D / 8; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[c][e] = dv[c][e] = 0.0f;
    const int block_first = causal ? max(0, key0 - offset) : 0;               // the first query that sees a key here
    for (int head = 0; head < group; ++head) {
        const long long n = kv * group + head;
        for (int i0 = (block_first / BM) * BM; i0 < tq; i0 += BM) {
            __syncthreads();
            tc_load<T, BM, D, LD>(q_s, q + n * tq * D, i0, tq);
            tc_load<T, BM, D, LD>(g_s, grad_out + n * tq * D, i0, tq);
            if (threadIdx.x < BM) {
                const int i = i0 + threadIdx.x;
                lse_s[threadIdx.x] = i < tq ? lse[n * tq + i] : 0.0f;
                delta_s[threadIdx.x] = i < tq ? delta[n * tq + i] : 0.0f;
            }
            __syncthreads();
            float p[BM / 8][4], ds[BM / 8][4];
            tc_times_transposed<T, D, BM, LD>(p, ka, q_s);                       // Sᵀ = K Qᵀ
            tc_times_transposed<T, D, BM, LD>(ds, va, g_s);                      // dPᵀ = V dOᵀ
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = nb * 8 + 2 * t + (e & 1), i = i0 + col, j = keys[e >> 1];
                    const bool visible = i < tq && j < tk && (!causal || j <= i + offset);
                    p[nb][e] = visible ? expf(p[nb][e] * scale - lse_s[col]) : 0.0f;
                    ds[nb][e] = p[nb][e] * (ds[nb][e] - delta_s[col]) * scale;  // scale · dSᵀ
                }
            tc_accumulate<T, BM, D, LD>(dv, p, g_s);                             // dV += Pᵀ dO
            tc_accumulate<T, BM, D, LD>(dk, ds, q_s);                            // dK += scale dSᵀ Q
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (keys[h] >= tk) continue;
        float* out_k = grad_k + (kv * tk + keys[h]) * D + 2 * t;
        float* out_v = grad_v + (kv * tk + keys[h]) * D + 2 * t;
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
            *reinterpret_cast<float2*>(out_k + c * 8) = make_float2(dk[c][2 * h], dk[c][2 * h + 1]);
            *reinterpret_cast<float2*>(out_v + c * 8) = make_float2(dv[c][2 * h], dv[c][2 * h + 1]);
        }
    }
}
"""


_TC_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
TC_DIMS = (32, 64)                        # head sizes the tensor-core kernels are built for (D = Dv)


@functools.lru_cache(maxsize=None)
def _has_tensor_cores(device_id: int) -> bool:
    """bf16 WMMA needs compute capability 8.0 (Ampere) or newer."""
    import cupy  # noqa: PLC0415

    return cupy.cuda.Device(device_id).compute_capability >= "80"


def flash_tc_eligible(q, k, v, dtype) -> bool:
    """Whether the tensor-core flash kernels take q, k, v (CuPy) once cast to ``dtype`` (bf16/fp16):
    head sizes D = Dv in TC_DIMS, keys present, a GPU with bf16 tensor cores."""
    import numpy as np  # noqa: PLC0415

    return (dtype is not None and np.dtype(dtype).name in _TC_TYPES and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and q.shape[-1] in TC_DIMS and k.shape[-2] > 0 and _has_tensor_cores(q.device.id))


def _tc_kernel(kind: str, dtype, dim: int):
    from .common import compile_module  # noqa: PLC0415

    name = f"flash_tc_{kind}<{_TC_TYPES[dtype.name]}, {dim}>"
    return compile_module(_FLASH_TC_SOURCE, (name,), ("--std=c++14",)).get_function(name)


def _tc_operand(a):
    """C-contiguous and 16-byte aligned (the kernels load rows as 16-byte vectors)."""
    import cupy  # noqa: PLC0415

    a = cupy.ascontiguousarray(a)
    return a if a.data.ptr % 16 == 0 else a.copy()


def _flash_tc_forward(q, k, v, causal: bool, scale: float):
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    q, k, v = (_tc_operand(a) for a in (q, k, v))
    nq, nk, tq, tk, d, _, group = _flash_args(q, k, v)
    out = cupy.empty((nq, tq, d), dtype=np.float32)
    lse = cupy.empty((nq, tq), dtype=np.float32)
    if nq and tq:
        _tc_kernel("forward", q.dtype, d)(((tq + 63) // 64, nq), (128,),
                                          (q, k, v, out, lse, np.int32(tq), np.int32(tk), group,
                                           np.int32(causal), np.float32(scale)))
    return out, lse


def _flash_tc_backward(q, k, v, out, lse, grad_out, causal: bool, scale: float):
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    q, k, v = (_tc_operand(a) for a in (q, k, v))
    grad_out = cupy.ascontiguousarray(grad_out, dtype=np.float32)
    nq, nk, tq, tk, d, _, group = _flash_args(q, k, v)
    delta = cupy.sum(grad_out * out, axis=-1)                          # Δ_i = Σ_c dO_ic O_ic  (NQ, Tq), float32
    g = _tc_operand(grad_out.astype(q.dtype))                          # dO as a tensor-core operand
    grad_q = cupy.empty((nq, tq, d), dtype=np.float32)
    grad_k = cupy.empty((nk, tk, d), dtype=np.float32)
    grad_v = cupy.empty((nk, tk, d), dtype=np.float32)
    sizes = (np.int32(tq), np.int32(tk), group, np.int32(causal), np.float32(scale))
    if nq and tq:
        _tc_kernel("backward_dq", q.dtype, d)(((tq + 63) // 64, nq), (128,), (q, k, v, g, lse, delta, grad_q) + sizes)
        _tc_kernel("backward_dkv", q.dtype, d)(((tk + 63) // 64, nk), (128,),
                                               (q, k, v, g, lse, delta, grad_k, grad_v) + sizes)
    else:
        grad_k.fill(0)
        grad_v.fill(0)
    return grad_q, grad_k, grad_v


def compile_check_sources():
    """(label, source, template instances) of every kernel of this module, for an offline compile check."""
    names = []
    for t, a in _ATTENTION_TYPES.values():
        names += [f"attention_softmax_forward<{t}, {a}>", f"attention_softmax_backward<{t}, {a}>"]
    flash = []
    for t, a in _FLASH_TYPES.values():
        size = 8 if a == "double" else 4
        for dim in _FLASH_DIMS:
            tile = _flash_tile(dim, size)
            flash += [f"flash_forward<{t}, {a}, {dim}, {FLASH_THREADS}, {tile}>",
                      f"flash_backward_dq<{t}, {a}, {dim}, {FLASH_THREADS}, {tile}>",
                      f"flash_backward_dkv<{t}, {a}, {dim}, {tile}, {FLASH_THREADS}>"]
    tensor_cores = [f"flash_tc_{kind}<{t}, {dim}>" for t in _TC_TYPES.values() for dim in TC_DIMS
                    for kind in ("forward", "backward_dq", "backward_dkv")]
    return [("attention softmax", _ATTENTION_SOFTMAX_SOURCE, names), ("flash", _FLASH_SOURCE, flash),
            ("flash, tensor cores", _FLASH_TC_SOURCE, tensor_cores)]


# ================================================================ the score-matrix path
#
# Attention through cuBLAS products around the materialised (n, G·Tq, Tk) score
# matrix, with the mask + softmax and the softmax backward as the row kernels
# above: two products and one kernel forward, five products (P recomputed) and
# one kernel backward. The products read q, k, v in place (transposes are
# flags), fold the scale and the dropout factor into alpha, and accept bf16/fp16
# operands with float32 results (autocast); the scores and P stay float32.
# Memory O(Tq·Tk) per call while it runs (nothing of that size is kept unless P
# is saved), and on tensor cores; the flash kernels above keep O(T) but run on
# the CUDA cores.


def _acc_dtype(dtype):
    import numpy as np  # noqa: PLC0415

    return np.dtype(np.float64 if dtype == np.float64 else np.float32)


# Causal attention only needs, for a block of query rows ending at r1, the keys up to
# r1 + Tk - Tq: split the queries into SCORE_BLOCKS blocks and the products and
# softmax passes skip the all-masked upper right (at 4 blocks, 10/16 of the work).
# Each block is itself a causal attention whose queries are the last of its keys,
# so the row kernels apply unchanged. (Grouped queries interleave rows of several
# heads in the product's rows, so they take one block.)
SCORE_BLOCKS = 4
SCORE_BLOCK_MIN_ROWS = 256


def _rows(a, r0: int, r1: int):
    """Query rows r0..r1-1 of a (n, G, Tq, ·) array as an (n, G·rows, ·) view: a block of one
    head (G = 1), or every row (the one block of grouped queries, a contiguous reshape)."""
    if a.shape[1] == 1:
        return a[:, 0, r0:r1]
    import cupy  # noqa: PLC0415

    assert (r0, r1) == (0, a.shape[2]), "grouped queries take one block"
    return cupy.ascontiguousarray(a).reshape(a.shape[0], -1, a.shape[-1])   # outputs are allocated contiguous


def _query_blocks(tq: int, tk: int, causal: bool, group: int) -> list[tuple[int, int, int]]:
    """(first row, end row, end key) of each query block."""
    if not causal or group != 1 or tq < SCORE_BLOCK_MIN_ROWS:
        return [(0, tq, tk)]
    step = -(-tq // SCORE_BLOCKS)
    step = -(-step // 64) * 64                         # multiples of 64 rows
    return [(r0, min(r0 + step, tq), min(r0 + step, tq) + tk - tq) for r0 in range(0, tq, step)]


def scores_attention_forward(q4, k3, v3, causal: bool, scale: float, keep=None, keep_scale: float = 1.0,
                             tf32: bool = False):
    """q4 (n, G, Tq, D), k3 (n, Tk, D), v3 (n, Tk, Dv) CuPy arrays of one dtype; ``keep`` (n, G, Tq, Tk)
    bool dropout mask or None. Returns (out (n, G, Tq, Dv) in the accumulator dtype (float32, or
    float64 for float64), P: a list of the query blocks' (n, G, rows, keys) probabilities)."""
    import cupy  # noqa: PLC0415

    from .matmul import gemm  # noqa: PLC0415

    n, group, tq, d = q4.shape
    tk, dv = v3.shape[-2:]
    acc = _acc_dtype(q4.dtype)
    out = cupy.empty((n, group, tq, dv), dtype=acc)
    probs = []
    for r0, r1, k_end in _query_blocks(tq, tk, causal, group):
        rows = (r1 - r0) * group
        q_rows = _rows(q4, r0, r1)                                                      # (n, rows, D)
        scores = gemm(q_rows, k3[:, :k_end], trans_b=True, alpha=scale, out_dtype=acc, tf32=tf32)
        p = attention_softmax_forward_(scores.reshape(n, group, r1 - r0, k_end), causal)   # P, in place
        block_keep = None if keep is None else cupy.ascontiguousarray(keep[:, :, r0:r1, :k_end])
        kept = p if block_keep is None else p * block_keep                          # P ⊙ M
        gemm(kept.astype(q4.dtype, copy=False).reshape(n, rows, k_end), v3[:, :k_end],
             alpha=keep_scale if keep is not None else 1.0, tf32=tf32,
             out=_rows(out, r0, r1))
        probs.append(p)
    return out, probs


def scores_attention_backward(grad4, q4, k3, v3, probs, causal: bool, scale: float, keep=None,
                              keep_scale: float = 1.0, tf32: bool = False):
    """(dQ (n, G, Tq, D), dK (n, Tk, D), dV (n, Tk, Dv)) given dO ``grad4`` (n, G, Tq, Dv); P (the
    forward's list of blocks) is recomputed when ``probs`` is None. Gradients in the accumulator
    dtype; dK, dV summed over G (and over the query blocks)."""
    import cupy  # noqa: PLC0415

    from .matmul import gemm  # noqa: PLC0415

    n, group, tq, d = q4.shape
    tk, dv = v3.shape[-2:]
    acc = _acc_dtype(q4.dtype)
    factor = keep_scale if keep is not None else 1.0
    if probs is not None and not isinstance(probs, list):
        probs = [probs]
    grad_q = cupy.empty((n, group, tq, d), dtype=acc)
    grad_k = cupy.zeros((n, tk, d), dtype=acc)
    grad_v = cupy.zeros((n, tk, dv), dtype=acc)
    for index, (r0, r1, k_end) in enumerate(_query_blocks(tq, tk, causal, group)):
        rows = (r1 - r0) * group
        q_rows = _rows(q4, r0, r1)
        if probs is None:                                                              # recompute P
            scores = gemm(q_rows, k3[:, :k_end], trans_b=True, alpha=scale, out_dtype=acc, tf32=tf32)
            p = attention_softmax_forward_(scores.reshape(n, group, r1 - r0, k_end), causal)
        else:
            p = probs[index]
        block_keep = None if keep is None else cupy.ascontiguousarray(keep[:, :, r0:r1, :k_end])
        g = _rows(grad4, r0, r1).astype(q4.dtype, copy=False)                           # dO as an operand
        kept = p if block_keep is None else p * block_keep
        gemm(kept.astype(q4.dtype, copy=False).reshape(n, rows, k_end), g, trans_a=True, alpha=factor,
             out=grad_v[:, :k_end], accumulate=True, tf32=tf32)                       # += P̃ᵀ dO
        grad_scores = gemm(g, v3[:, :k_end], trans_b=True, out_dtype=acc, tf32=tf32)   # dP̃ = dO Vᵀ
        attention_softmax_backward_(grad_scores.reshape(n, group, r1 - r0, k_end), p, causal, block_keep,
                                    keep_scale)                                        # dS, in place
        ds = grad_scores.astype(q4.dtype, copy=False)
        gemm(ds, k3[:, :k_end], alpha=scale, tf32=tf32, out=_rows(grad_q, r0, r1))       # s dS K
        gemm(ds, q_rows, trans_a=True, alpha=scale, out=grad_k[:, :k_end], accumulate=True, tf32=tf32)  # += s dSᵀ Q
    return grad_q, grad_k, grad_v


# ================================================================ the CPU's row kernels
#
# The two row kernels of part 1 as C++ loops for the CPU (compiled by kernels/cpu.py),
# for the tiles of ops/attention.py: there a tile of scores is a strided view
# (matrices × query rows × keys) of the (N, G, Tq, Tk) buffer, and the NumPy passes
# make five or six sweeps over it (mask, max, subtract, exp, sum, scale), two of
# them broadcasts of a per-row scalar that cost about twice a plain pass. Here each
# row is finished while it sits in L1: forward reads the row's visible keys three
# times (max; exp and sum; scale) and zeroes the masked rest; backward reads two
# rows twice (dot; dS). The compiler vectorises the loops, exp through glibc's
# vector math (cpu.py's header). Masked keys are never exponentiated: at T = 256 in
# tiles of 128 rows that is a third of the tiles' scores.

_CPU_SOURCE = r"""
#include <math.h>
#include <string.h>

// GCC keeps to 256-bit vectors by default even where the CPU has AVX-512; the exp loops run ~15%
// faster in 512-bit ones (glibc has those too). On the entries, where the loops are inlined and
// vectorised. Other compilers: their default.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#define WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define WIDE_VECTORS
#endif

// Keys 0..visible-1 of row i are seen: all, or when causal those j <= i + offset.
static inline long visible_keys(long i, long cols, int causal, long offset) {
    if (!causal) return cols;
    long n = i + offset + 1;
    return n < 0 ? 0 : (n > cols ? cols : n);
}

// max(x[0..n-1]) (-inf for n = 0), in two vectors of maxima (GCC's vector extension): the compiler
// does not vectorise a plain max reduction, since infinities and NaN keep their meaning here. (A NaN
// the vectors pass over still makes the whole row NaN, through its exp and the row's sum.)
template <typename T>
static inline T row_maximum(const T* __restrict x, long n) {
    typedef T vec __attribute__((vector_size(32)));
    constexpr int W = 32 / sizeof(T);
    vec m0, m1;
    for (int k = 0; k < W; k++) m0[k] = m1[k] = -INFINITY;
    long j = 0;
    for (; j + 2 * W <= n; j += 2 * W) {
        vec a, b;
        memcpy(&a, x + j, sizeof a);
        memcpy(&b, x + j + W, sizeof b);
        m0 = a > m0 ? a : m0;
        m1 = b > m1 ? b : m1;
    }
    m0 = m1 > m0 ? m1 : m0;
    T result = -INFINITY;
    for (int k = 0; k < W; k++) result = m0[k] > result ? m0[k] : result;
    for (; j < n; j++) result = x[j] > result ? x[j] : result;
    return result;
}

// scores: `matrices` blocks `matrix_stride` elements apart, of `rows` rows `row_stride` apart,
// `cols` keys each. In place: P = softmax over the visible keys, 0 on the masked ones.
template <typename T>
static void softmax_forward(T* scores, long matrices, long matrix_stride, long rows, long row_stride,
                            long cols, int causal, long offset) {
    for (long b = 0; b < matrices; b++) {
        for (long i = 0; i < rows; i++) {
            T* __restrict x = scores + b * matrix_stride + i * row_stride;
            const long n = visible_keys(i, cols, causal, offset);
            const T row_max = row_maximum(x, n);
            T row_sum = 0;
            for (long j = 0; j < n; j++) {
                const T e = exp(x[j] - row_max);
                x[j] = e;
                row_sum += e;
            }
            const T inv_sum = T(1) / row_sum;
            for (long j = 0; j < n; j++) x[j] *= inv_sum;
            for (long j = n; j < cols; j++) x[j] = 0;
        }
    }
}

// In place on grad (dL/dP~, laid out as grad_*): dS = P (dP - sum_j dP_j P_j) over the visible
// keys, 0 on the masked ones, with dP = dP~ keep keep_scale when `keep` (bytes 0/1) is given.
template <typename T>
static void softmax_backward(T* grad, long grad_matrix_stride, long grad_row_stride,
                             const T* probs, long probs_matrix_stride, long probs_row_stride,
                             const unsigned char* keep, long keep_matrix_stride, long keep_row_stride,
                             double keep_scale, long matrices, long rows, long cols, int causal, long offset) {
    const T scale = T(keep_scale);
    for (long b = 0; b < matrices; b++) {
        for (long i = 0; i < rows; i++) {
            T* __restrict g = grad + b * grad_matrix_stride + i * grad_row_stride;
            const T* __restrict p = probs + b * probs_matrix_stride + i * probs_row_stride;
            const long n = visible_keys(i, cols, causal, offset);
            if (keep) {
                const unsigned char* __restrict m = keep + b * keep_matrix_stride + i * keep_row_stride;
                for (long j = 0; j < n; j++) g[j] = g[j] * T(m[j]) * scale;
            }
            T dot = 0;
            for (long j = 0; j < n; j++) dot += g[j] * p[j];
            for (long j = 0; j < n; j++) g[j] = p[j] * (g[j] - dot);
            for (long j = n; j < cols; j++) g[j] = 0;
        }
    }
}

#define ENTRIES(T, SUFFIX)                                                                           \
extern "C" WIDE_VECTORS void attention_softmax_forward_##SUFFIX(T* scores, long matrices,             \
        long matrix_stride, long rows, long row_stride, long cols, int causal, long offset) {        \
    softmax_forward<T>(scores, matrices, matrix_stride, rows, row_stride, cols, causal, offset);     \
}                                                                                                    \
extern "C" WIDE_VECTORS void attention_softmax_backward_##SUFFIX(T* grad, long gm, long gr,           \
        const T* probs, long pm, long pr, const unsigned char* keep, long km, long kr,               \
        double keep_scale, long matrices, long rows, long cols, int causal, long offset) {           \
    softmax_backward<T>(grad, gm, gr, probs, pm, pr, keep, km, kr, keep_scale, matrices, rows, cols, \
                        causal, offset);                                                             \
}
ENTRIES(float, f32)
ENTRIES(double, f64)
"""

_LONG, _INT, _POINTER = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
_CPU_ARGTYPES = {
    "forward": [_POINTER, _LONG, _LONG, _LONG, _LONG, _LONG, _INT, _LONG],
    "backward": [_POINTER, _LONG, _LONG, _POINTER, _LONG, _LONG, _POINTER, _LONG, _LONG, ctypes.c_double,
                 _LONG, _LONG, _LONG, _INT, _LONG],
}


@functools.lru_cache(maxsize=None)
def _cpu_entry(kind: str, dtype):
    """The compiled ``attention_softmax_{kind}`` for float32/float64, or None when it cannot be built."""
    lib = cpu.library("attention_softmax", cpu.HEADER + _CPU_SOURCE)
    if lib is None:
        return None
    entry = getattr(lib, f"attention_softmax_{kind}_{'f32' if dtype == np.float32 else 'f64'}")
    entry.argtypes, entry.restype = _CPU_ARGTYPES[kind], None
    return entry


def _cpu_rows(a) -> tuple[int, int, int]:
    """(matrices, matrix stride, row stride) of a (…, rows, cols) NumPy view, strides in elements:
    the view's keys must be contiguous and its leading axes must merge into one (a tile of the
    (N, G, Tq, Tk) buffer does)."""
    item = a.itemsize
    leading = [(size, stride) for size, stride in zip(a.shape[:-2], a.strides[:-2]) if size != 1]
    if (a.shape[-1] > 1 and a.strides[-1] != item) or any(s % item for s in a.strides[-2:]) or any(
            s0 != n1 * s1 for (_, s0), (n1, s1) in zip(leading, leading[1:])) or any(s % item for _, s in leading):
        raise ValueError(f"attention softmax (CPU): cannot address rows of a view with strides {a.strides}")
    return math.prod(a.shape[:-2]), (leading[-1][1] // item if leading else 0), a.strides[-2] // item


def cpu_softmax_usable(*arrays) -> bool:
    """True when the CPU row kernels take these arrays (``cpu.fusable``: NumPy, C-contiguous, all
    float32 or all float64, kernels on) and have compiled; the kernels then also take views of them."""
    return cpu.fusable(*arrays) and all(_cpu_entry(kind, arrays[0].dtype) is not None
                                        for kind in ("forward", "backward"))   # both loaded here, not in threads


def cpu_softmax_forward_(scores, causal: bool) -> None:
    """In place on a NumPy (…, Tq, Tk) float32/float64 view (keys contiguous, leading axes mergeable):
    the causal mask and a stable softmax, as ``attention_softmax_forward_`` on a GPU.

    Row i keeps keys j <= i + (Tk − Tq) when ``causal`` (all otherwise), becomes
    exp(s − max) / Σ exp(s − max) there and 0 on the masked keys. Runs on the
    calling thread, with the GIL let go (the tiles are already shared out).
    """
    tq, tk = scores.shape[-2:]
    if scores.size == 0:
        return
    matrices, matrix_stride, row_stride = _cpu_rows(scores)
    _cpu_entry("forward", scores.dtype)(scores.ctypes.data, matrices, matrix_stride, tq, row_stride, tk,
                                        int(causal), tk - tq)


def cpu_softmax_backward_(grad_probs, probs, causal: bool, keep=None, keep_scale: float = 1.0) -> None:
    """In place on NumPy (…, Tq, Tk) views of one shape and dtype (``keep`` a bool dropout mask or None):
    dL/dP̃ -> dS = P ⊙ (dP − rowsum(dP ⊙ P)), dP = dP̃ ⊙ keep · keep_scale; 0 on masked keys."""
    tq, tk = probs.shape[-2:]
    if probs.size == 0:
        return
    if grad_probs.shape != probs.shape or grad_probs.dtype != probs.dtype or (
            keep is not None and (keep.shape != probs.shape or keep.dtype != np.bool_)):
        raise ValueError("attention softmax backward (CPU): grad, probs and keep must share their shape")
    matrices, grad_matrix, grad_row = _cpu_rows(grad_probs)
    _, probs_matrix, probs_row = _cpu_rows(probs)
    keep_matrix, keep_row = _cpu_rows(keep)[1:] if keep is not None else (0, 0)
    _cpu_entry("backward", probs.dtype)(
        grad_probs.ctypes.data, grad_matrix, grad_row, probs.ctypes.data, probs_matrix, probs_row,
        None if keep is None else keep.ctypes.data, keep_matrix, keep_row, float(keep_scale),
        matrices, tq, tk, int(causal), tk - tq)
