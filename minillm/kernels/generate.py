"""CUDA kernels behind the CUDA-graph decode step of minillm/generate.py.

A captured graph replays with its kernel arguments frozen, so everything that
changes from one token to the next is read from device memory: the token ids
and the position ``pos`` (an int32 array of one element). These three kernels
are the parts of a decode step that depend on the position:

- ``embed_at_position``   x = wte[ids] + wpe[pos]                          (B, C)
- ``kv_cache_write``      the new token's k and v into the caches at pos   (B, H, L, Dh)
- ``decode_attention``    softmax(q · K[0..pos] · scale) V[0..pos], one block per (row, head)

Everything else in the step (layer norms, linear layers, GELU) is the model's
own layers, whose launches do not depend on the position.
"""

from __future__ import annotations

_DECODE_SOURCE = r"""
#define MINUS_INFINITY __int_as_float(0xff800000)
__device__ float block_reduce(float v, float* scratch, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : (is_max ? MINUS_INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    __syncthreads();   // scratch is reused by the next reduction
    return v;
}

// x (B, C) = wte[ids[b]] + wpe[pos]; one block per row.
extern "C" __global__ void embed_at_position(const long long* ids, const float* wte, const float* wpe,
                                             const int* pos, float* x, int c) {
    const long long b = blockIdx.x, token = ids[b], p = pos[0];
    for (int j = threadIdx.x; j < c; j += blockDim.x) x[b * c + j] = wte[token * c + j] + wpe[p * c + j];
}

// qkv (B, 3C) = [q | k | v] of the new token; k_cache, v_cache (B, H, L, Dh) get k, v at position pos.
extern "C" __global__ void kv_cache_write(const float* qkv, float* k_cache, float* v_cache, const int* pos,
                                          int heads, int max_len, int head_dim) {
    const long long b = blockIdx.x, p = pos[0];
    const int c = heads * head_dim;
    for (int e = threadIdx.x; e < c; e += blockDim.x) {
        const int head = e / head_dim, d = e % head_dim;
        const long long slot = ((b * heads + head) * max_len + p) * head_dim + d;
        k_cache[slot] = qkv[b * 3 * c + c + e];
        v_cache[slot] = qkv[b * 3 * c + 2 * c + e];
    }
}

// One block per (row b, head): out[b, head·Dh : (head+1)·Dh] = Σ_{j<=pos} softmax_j(scale q·k_j) v_j.
// scratch (B·H, L) holds the scores, then exp(score - max).
extern "C" __global__ void decode_attention(const float* qkv, const float* k_cache, const float* v_cache,
                                            const int* pos, float* scratch, float* out,
                                            int heads, int max_len, int head_dim, float scale) {
    __shared__ float reduce_scratch[32];
    const long long b = blockIdx.x / heads;
    const int head = blockIdx.x % heads, c = heads * head_dim, n = pos[0] + 1;
    const float* q = qkv + b * 3 * c + head * head_dim;
    const float* keys = k_cache + (b * heads + head) * (long long)max_len * head_dim;
    const float* values = v_cache + (b * heads + head) * (long long)max_len * head_dim;
    float* s = scratch + (long long)blockIdx.x * max_len;
    float m = MINUS_INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float dot = 0.0f;
        for (int d = 0; d < head_dim; ++d) dot += q[d] * keys[(long long)j * head_dim + d];
        s[j] = dot * scale;
        m = fmaxf(m, s[j]);
    }
    m = block_reduce(m, reduce_scratch, true);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(s[j] - m);
        s[j] = e;
        sum += e;
    }
    sum = block_reduce(sum, reduce_scratch, false);
    __syncthreads();   // every s[j] written before any thread reads them all
    const float inv = 1.0f / sum;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < n; ++j) acc += s[j] * values[(long long)j * head_dim + d];
        out[b * c + head * head_dim + d] = acc * inv;
    }
}
"""
_NAMES = ("embed_at_position", "kv_cache_write", "decode_attention")
THREADS = 128


def _kernel(name: str):
    from .common import compile_module  # noqa: PLC0415

    return compile_module(_DECODE_SOURCE, _NAMES).get_function(name)


def embed_at_position(ids, wte, wpe, pos, out) -> None:
    """out (B, C) = wte[ids] + wpe[pos[0]] (float32 CuPy arrays, ids int64, pos int32 (1,))."""
    import numpy as np  # noqa: PLC0415

    _kernel("embed_at_position")((ids.shape[0],), (THREADS,), (ids, wte, wpe, pos, out, np.int32(wte.shape[1])))


def kv_cache_write(qkv, k_cache, v_cache, pos) -> None:
    """Write the new token's k, v (columns C..2C and 2C..3C of qkv (B, 3C)) at position pos[0]."""
    import numpy as np  # noqa: PLC0415

    b, heads, max_len, head_dim = k_cache.shape
    _kernel("kv_cache_write")((b,), (THREADS,), (qkv, k_cache, v_cache, pos, np.int32(heads), np.int32(max_len),
                                                 np.int32(head_dim)))


def decode_attention(qkv, k_cache, v_cache, pos, scratch, out, scale: float) -> None:
    """out (B, C): each head's attention of the new query (columns 0..C of qkv) over keys 0..pos[0]."""
    import numpy as np  # noqa: PLC0415

    b, heads, max_len, head_dim = k_cache.shape
    _kernel("decode_attention")((b * heads,), (THREADS,),
                                (qkv, k_cache, v_cache, pos, scratch, out, np.int32(heads), np.int32(max_len),
                                 np.int32(head_dim), np.float32(scale)))


def compile_check_sources():
    return [("decode", _DECODE_SOURCE, list(_NAMES))]
