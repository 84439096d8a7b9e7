"""Kernels behind minillm/optim: the fused AdamW update, per parameter (CUDA, and compiled for the
CPU from the same body) and multi-tensor (CUDA), and the multi-tensor norm and scale of gradient
clipping (CUDA)."""

from __future__ import annotations

import functools

import numpy as np

from . import cpu

# ================================================================ optimizer: AdamW
#
# The whole AdamW update of one parameter in one launch: it reads p, g, m, v
# once and writes p, m, v once, where the array-module version makes a dozen
# passes. minillm/optim/adamw.py updates CuPy parameters with multi_adamw_
# below (one launch for all parameters of a group that share a step count)
# and falls back to this kernel, one launch per parameter, for arrays that one
# does not take (non-contiguous, or a dtype other than float32/float64).


_ADAMW_PARAMS = ("T grad, T beta1, T beta2, T step_size, T eps_hat, T decay", "T param, T exp_avg, T exp_avg_sq")
_ADAMW_BODY = """
        exp_avg = beta1 * exp_avg + ((T)1 - beta1) * grad;
        exp_avg_sq = beta2 * exp_avg_sq + ((T)1 - beta2) * grad * grad;
        param = decay * param - step_size * (exp_avg / (sqrt(exp_avg_sq) + eps_hat));
        """


# The products are grouped as NumPy's passes group them (minillm/optim/adamw.py), so that the
# kernel overflows where they do and nowhere else: step_size * (m / (√v + eps_hat)), not
# (step_size * m) / ..., which is inf / inf = NaN for m = 1.5e38 in float32 with a large lr (and
# loses digits for subnormal m). The CPU loop is compiled with fast math (kernels/cpu.py), whose
# reassociation would regroup (1 - beta2) * grad * grad as (1 - beta2) * (grad * grad) (grad = 1e20
# in float32: v = inf and no step, where NumPy gets 1e37): there it is turned off.
_ADAMW_CPU_PREAMBLE = '#pragma GCC optimize("no-tree-reassoc")'


@functools.lru_cache(maxsize=None)
def _adamw_kernel(device: str = "cuda"):
    """The update as an elementwise kernel: ``cupy.ElementwiseKernel`` on a GPU, the compiled loop
    of ``kernels.cpu.ElementwiseKernel`` for NumPy arrays; the same body."""
    if device == "cpu":
        module = cpu
    else:
        import cupy as module  # noqa: PLC0415
    return module.ElementwiseKernel(*_ADAMW_PARAMS, _ADAMW_BODY, "minillm_adamw_update",
                                    preamble=_ADAMW_CPU_PREAMBLE if device == "cpu" else "")


def adamw_cpu_fusable(arrays) -> bool:
    """True when the compiled CPU loop takes these NumPy arrays (``kernels.cpu.fusable``, built)."""
    if not cpu.fusable(*arrays):
        return False
    one = arrays[0]                                       # one (grad, 5 numbers, p, m, v) call builds the loop
    return _adamw_kernel("cpu").available(one, *[0.0] * 5, one, one, one)


def adamw_update_(param, grad, exp_avg, exp_avg_sq, beta1: float, beta2: float,
                  step_size: float, eps_hat: float, decay: float) -> None:
    """One AdamW step in place on arrays of one shape and dtype (bias corrections pre-folded):

        m <- beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g^2
        p <- decay p - step_size m / (sqrt(v) + eps_hat)

    with decay = 1 - lr wd, step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t) and
    eps_hat = eps sqrt(1 - beta2^t) (see minillm/optim/adamw.py). CuPy arrays, or
    NumPy ones that ``adamw_cpu_fusable`` accepts (one compiled pass, in place of
    the dozen of ``_adamw_passes`` in minillm/optim/adamw.py, which it equals).
    """
    if isinstance(param, np.ndarray):
        _adamw_kernel("cpu")(grad, beta1, beta2, step_size, eps_hat, decay, param, exp_avg, exp_avg_sq)
        return
    scalar = param.dtype.type  # the scalars take the parameter's dtype: no float64 math for float32
    _adamw_kernel()(grad, scalar(beta1), scalar(beta2), scalar(step_size), scalar(eps_hat), scalar(decay),
                    param, exp_avg, exp_avg_sq)


# ================================================================ optimizer: multi-tensor kernels
#
# A model has ~150 parameter arrays, and one launch per array costs more than
# the arithmetic (GPT-2 small on an H200: ~6 ms of launching for the two passes
# of gradient clipping and ~2.6 ms for AdamW's, against ~0.2 ms of reading the
# gradients once). These kernels take all arrays of one dtype and
# device in one launch: a table lists each array's pointer(s) and size, and
# splits the arrays into chunks of CHUNK elements, one CUDA block per chunk.
# A kernel that works on several arrays per parameter (AdamW: p, g, m, v) has
# one pointer column for each; the i-th arrays of all columns have one size.
#
#   multi_sum_squares, multi_scale_  gradient clipping  (minillm/optim/clip.py)
#   multi_adamw_                     the AdamW update   (minillm/optim/adamw.py)

_MULTI_TENSOR_CHUNK = 1 << 16

_MULTI_TENSOR_SOURCE = r"""
// table (int64), for n_columns pointer columns:
//   [column 0's pointers (n_tensors) | ... | column n_columns-1's pointers (n_tensors) |
//    sizes (n_tensors) | chunk's tensor (n_chunks) | chunk's start (n_chunks)]
// This block's work: tensor *tensor, elements [chunk's start, min(start + chunk, size));
// this thread's share starts at *begin and steps by blockDim.x up to *end.
__device__ void chunk_range(const long long* table, int n_columns, int n_tensors, int n_chunks, int chunk,
                            long long* tensor, long long* begin, long long* end) {
    const long long* sizes = table + (long long)n_columns * n_tensors;
    const long long* chunk_tensor = sizes + n_tensors;
    const long long* chunk_start = chunk_tensor + n_chunks;
    *tensor = chunk_tensor[blockIdx.x];
    const long long start = chunk_start[blockIdx.x];
    const long long stop = start + chunk;
    *begin = start + threadIdx.x;
    *end = stop < sizes[*tensor] ? stop : sizes[*tensor];
}

// The array of `column` for tensor `tensor`.
template <typename T>
__device__ T* column_array(const long long* table, int column, int n_tensors, long long tensor) {
    return reinterpret_cast<T*>(table[(long long)column * n_tensors + tensor]);
}

// sqrt in the argument's own precision (no float -> double promotion): sqrtf for float.
__device__ inline float square_root(float x) { return sqrtf(x); }
__device__ inline double square_root(double x) { return sqrt(x); }

// partials[block, thread] = sum of x^2 over the thread's elements of the block's chunk (summed later).
template <typename T>
__global__ void multi_sum_squares(const long long* table, int n_tensors, int n_chunks, int chunk, T* partials) {
    long long tensor, i, end;
    chunk_range(table, 1, n_tensors, n_chunks, chunk, &tensor, &i, &end);
    const T* x = column_array<T>(table, 0, n_tensors, tensor);
    T sum = 0;
    for (; i < end; i += blockDim.x) sum += x[i] * x[i];
    partials[(long long)blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// x <- x * scale for every element of every array.
template <typename T>
__global__ void multi_scale(const long long* table, int n_tensors, int n_chunks, int chunk, T scale) {
    long long tensor, i, end;
    chunk_range(table, 1, n_tensors, n_chunks, chunk, &tensor, &i, &end);
    T* x = column_array<T>(table, 0, n_tensors, tensor);
    for (; i < end; i += blockDim.x) x[i] *= scale;
}

// The AdamW update of every element of every parameter; columns: param, grad, exp_avg, exp_avg_sq.
// The same expressions, in the same order, as the per-parameter kernel minillm_adamw_update.
template <typename T>
__global__ void multi_adamw(const long long* table, int n_tensors, int n_chunks, int chunk,
                            T beta1, T beta2, T step_size, T eps_hat, T decay) {
    long long tensor, i, end;
    chunk_range(table, 4, n_tensors, n_chunks, chunk, &tensor, &i, &end);
    T* param = column_array<T>(table, 0, n_tensors, tensor);
    const T* grad = column_array<T>(table, 1, n_tensors, tensor);
    T* exp_avg = column_array<T>(table, 2, n_tensors, tensor);
    T* exp_avg_sq = column_array<T>(table, 3, n_tensors, tensor);
    for (; i < end; i += blockDim.x) {
        const T g = grad[i];
        const T m = beta1 * exp_avg[i] + ((T)1 - beta1) * g;
        const T v = beta2 * exp_avg_sq[i] + ((T)1 - beta2) * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = decay * param[i] - step_size * (m / (square_root(v) + eps_hat));
    }
}
"""

_MULTI_TENSOR_TYPES = {"float32": "float", "float64": "double"}
_MULTI_TENSOR_KERNELS = ("multi_sum_squares", "multi_scale", "multi_adamw")
_MULTI_TENSOR_THREADS = 256


@functools.lru_cache(maxsize=None)
def _multi_tensor_module():
    import cupy  # noqa: PLC0415

    names = [f"{k}<{t}>" for t in _MULTI_TENSOR_TYPES.values() for k in _MULTI_TENSOR_KERNELS]
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


def _multi_tensor_table(columns):
    """The launch table (int64 NumPy, layout in _MULTI_TENSOR_SOURCE) for ``columns``,
    a list of equally long lists of arrays, and its number of chunks.

    For arrays of sizes [1, 65536, 65537] and CHUNK = 65536, one column:
        pointers [p0, p1, p2] | sizes [1, 65536, 65537] | chunk's tensor [0, 1, 2, 2]
        | chunk's start [0, 0, 0, 65536]
    (a 0-size array gets no chunk and is never read)."""
    import numpy as np  # noqa: PLC0415

    sizes_list = [a.size for a in columns[0]]
    for column in columns[1:]:  # a kernel indexes every column by column 0's sizes
        if len(column) != len(sizes_list) or [a.size for a in column] != sizes_list:
            raise ValueError("multi-tensor kernel: the i-th arrays of all columns must have one size")
    sizes = np.array(sizes_list, dtype=np.int64)
    chunks = -(-sizes // _MULTI_TENSOR_CHUNK)  # per array
    n_chunks = int(chunks.sum())
    first_chunk = np.repeat(np.cumsum(chunks) - chunks, chunks)  # per chunk: its array's first chunk
    pointers = np.array([a.data.ptr for column in columns for a in column], dtype=np.uint64).view(np.int64)
    table = np.concatenate([
        pointers, sizes,
        np.repeat(np.arange(len(sizes_list), dtype=np.int64), chunks),
        (np.arange(n_chunks, dtype=np.int64) - first_chunk) * _MULTI_TENSOR_CHUNK])
    return table, n_chunks


def _multi_tensor_launch(name: str, columns, *args) -> int:
    """Launch kernel ``name`` over ``columns`` (lists of arrays, see _multi_tensor_table) with the
    trailing kernel arguments ``args``; one block per chunk. Returns the number of chunks."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    table, n_chunks = _multi_tensor_table(columns)
    kernel = _multi_tensor_module().get_function(f"{name}<{_MULTI_TENSOR_TYPES[columns[0][0].dtype.name]}>")
    if n_chunks:
        kernel((n_chunks,), (_MULTI_TENSOR_THREADS,),
               (cupy.asarray(table), np.int32(len(columns[0])), np.int32(n_chunks), np.int32(_MULTI_TENSOR_CHUNK),
                *args))
    return n_chunks


def multi_sum_squares(arrays):
    """Σ over all arrays of Σ x², as a 0-d CuPy array (no host sync): one launch
    for all arrays, then one sum over the per-thread partial sums. The arrays
    must pass :func:`multi_tensor_fusable`. Equals ``sum(xp.vdot(a, a) for a in arrays)``."""
    import cupy  # noqa: PLC0415

    sizes = [a.size for a in arrays]
    n_chunks = sum(-(-n // _MULTI_TENSOR_CHUNK) for n in sizes)
    partials = cupy.empty(n_chunks * _MULTI_TENSOR_THREADS, dtype=arrays[0].dtype)
    _multi_tensor_launch("multi_sum_squares", [arrays], partials)
    return partials.sum()


def multi_scale_(arrays, scale: float) -> None:
    """x *= scale for every array, in place, in one launch (arrays as for
    :func:`multi_tensor_fusable`). Equals ``for a in arrays: a *= scale``."""
    _multi_tensor_launch("multi_scale", [arrays], arrays[0].dtype.type(scale))


def multi_adamw_(params, grads, exp_avgs, exp_avg_sqs, beta1: float, beta2: float,
                 step_size: float, eps_hat: float, decay: float) -> None:
    """:func:`adamw_update_` for many parameters at once, in place, in one launch:

        for each i:  adamw_update_(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], beta1, ...)

    with one set of coefficients for all (so one step count t, see
    minillm/optim/adamw.py). ``params[i]``, ``grads[i]``, ``exp_avgs[i]`` and
    ``exp_avg_sqs[i]`` have one size, and all the arrays together pass
    :func:`multi_tensor_fusable`. Each element gets the very expressions of
    :func:`adamw_update_`, in the same order and in the parameters' dtype.
    """
    scalar = params[0].dtype.type  # the kernel's T: float32 scalars for float32 arrays
    _multi_tensor_launch("multi_adamw", [params, grads, exp_avgs, exp_avg_sqs],
                         scalar(beta1), scalar(beta2), scalar(step_size), scalar(eps_hat), scalar(decay))
