"""What the fused CUDA kernels share: the row-reduction device helpers, launch sizes, compilation.

The package ``minillm.kernels`` holds the only CUDA code in minillm, one module
per op family mirroring ``minillm/ops`` (and ``optim.py`` for ``minillm/optim``),
each kernel's source beside its Python launcher. Kernels are compiled on first
use and cached; CuPy is imported only inside functions, so importing the package
costs nothing without a GPU. An op selects a kernel only for CuPy arrays, and
every kernel is tested equal to the array-module (NumPy/CuPy) version.

Row kernels work on the last axis with one CUDA block per row: the block's
threads stride over the row, combine their partial results with warp shuffles
(``block_sum`` / ``block_max_sumexp``), and every thread then knows the row's
statistics. The (max, Σexp) pair is built in one pass ("online softmax": when a
larger value arrives, rescale the sum by exp(old_max - new_max)), so softmax and
cross-entropy read a row once for their statistics.
"""

from __future__ import annotations

import functools

import numpy as np

from ..backend import array_module

# Device helpers shared by the row kernels (softmax, cross-entropy, layer norm).
ROW_HELPERS_SOURCE = r"""
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

"""

ROW_KERNEL_TYPES = {"float32": "float", "float64": "double"}


def fusable(*arrays) -> bool:
    """True when every array is a CuPy array of float32 or float64, the dtypes the row
    kernels are compiled for (NumPy arrays and other dtypes take the array path)."""
    return all(
        not isinstance(a, np.ndarray) and array_module(a) is not np and a.dtype.name in ROW_KERNEL_TYPES
        for a in arrays
    )


def row_launch(n: int) -> int:
    """Threads per row block: ~4 elements per thread, a multiple of 32, at most 1024."""
    threads = 32
    while threads < 1024 and threads * 4 < n:
        threads *= 2
    return threads


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_id: int) -> int:
    import cupy  # noqa: PLC0415

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


@functools.lru_cache(maxsize=None)
def compile_module(source: str, names: tuple[str, ...], options: tuple[str, ...] = ("--std=c++14",)):
    """A ``cupy.RawModule`` for ``source`` with the template instances ``names``, compiled once
    (per process, and per device by CuPy's own cache)."""
    import cupy  # noqa: PLC0415

    return cupy.RawModule(code=source, options=options, name_expressions=list(names))


def row_kernel(source: str, names: tuple[str, ...], name: str, dtype):
    """The instance ``name`` (with ``{t}`` the C type of ``dtype``) of a row-kernel module."""
    module = compile_module(source, tuple(n.format(t=t) for t in ROW_KERNEL_TYPES.values() for n in names))
    return module.get_function(name.format(t=ROW_KERNEL_TYPES[dtype.name]))
