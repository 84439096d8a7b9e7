"""Kernels behind ops/activation.py: softmax / log-softmax (CUDA, one block per row) and GELU
(one elementwise kernel each way, on a GPU and, compiled, on the CPU)."""

from __future__ import annotations

import functools

import numpy as np

from . import cpu
from .common import ROW_HELPERS_SOURCE, fusable, row_kernel, row_launch  # noqa: F401 (fusable: re-exported)

_SOFTMAX_SOURCE = ROW_HELPERS_SOURCE + r"""
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

"""
_SOFTMAX_NAMES = ("softmax_forward<{t}, false>", "softmax_forward<{t}, true>",
                  "softmax_backward<{t}, false>", "softmax_backward<{t}, true>")


def _kernel(name, dtype):
    return row_kernel(_SOFTMAX_SOURCE, _SOFTMAX_NAMES, name, dtype)


def softmax_forward(x, log: bool = False):
    """softmax (``log``: log-softmax) over the last axis of a CuPy array: one block per row, one launch."""
    import cupy  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    x = cupy.ascontiguousarray(x)
    n = x.shape[-1]
    out = cupy.empty_like(x)
    rows = x.size // n if n else 0
    if rows:
        kernel = _kernel("softmax_forward<{t}, %s>" % ("true" if log else "false"), x.dtype)
        kernel((rows,), (row_launch(n),), (x, out, np.int32(n)))
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
        kernel = _kernel("softmax_backward<{t}, %s>" % ("true" if log else "false"), out.dtype)
        kernel((rows,), (row_launch(n),), (grad, out, dx, np.int32(n)))
    return dx


# GELU's arithmetic, written once: each body is the per-element code of a CUDA ElementwiseKernel on a
# GPU and of a compiled loop on the CPU (kernels/cpu.py); only normal_cdf differs between the two.
_GELU_PREAMBLES = {
    "cuda": r"""
__device__ float normal_cdf(float x) { return normcdff(x); }
__device__ double normal_cdf(double x) { return normcdf(x); }
""",
    "cpu": r"""
template <typename T> static inline T normal_cdf(T x) { return T(0.5) * erfc(x * T(-0.7071067811865476)); }
""",
}
_GELU_K = "const T k = 0.7978845608028654, c = 0.044715;\n"   # √(2/π) and GELU's cubic coefficient
_GELU_BODIES = {
    ("tanh", "forward"): _GELU_K + "y = T(0.5) * x * (T(1) + tanh(k * x * (T(1) + c * x * x)));",
    ("tanh", "backward"): _GELU_K + """
        const T x2 = x * x;
        const T t = tanh(k * x * (T(1) + c * x2));
        dx = g * (T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * k * (T(1) + T(3) * c * x2));""",
    ("none", "forward"): "y = x * normal_cdf(x);",
    ("none", "backward"): "dx = g * (normal_cdf(x) + x * exp(T(-0.5) * x * x) * T(0.3989422804014327));",
}
_GELU_PARAMS = {"forward": ("T x", "T y"), "backward": ("T g, T x", "T dx")}


@functools.lru_cache(maxsize=None)
def _gelu_kernel(approximate: str, direction: str, device: str = "cuda"):
    """GELU one way as an elementwise kernel: ``cupy.ElementwiseKernel`` for a GPU, the compiled
    loop of ``kernels.cpu.ElementwiseKernel`` for NumPy arrays; the same body."""
    if device == "cpu":
        module = cpu
    else:
        import cupy as module  # noqa: PLC0415
    return module.ElementwiseKernel(*_GELU_PARAMS[direction], _GELU_BODIES[approximate, direction],
                                    f"minillm_gelu_{approximate}_{direction}", preamble=_GELU_PREAMBLES[device])


def gelu_fusable(x, approximate: str) -> bool:
    """True when GELU runs as one kernel each way: a CuPy array, or a NumPy one that the compiled
    CPU loops take (``kernels.cpu.fusable``, and both loops built)."""
    if fusable(x):
        return True
    return cpu.fusable(x) and all(_gelu_kernel(approximate, direction, "cpu").available(x, x)
                                  for direction in ("forward", "backward"))


def gelu_forward(x, approximate: str):
    """GELU of an array in one elementwise kernel: x Φ(x), or GPT-2's tanh form."""
    if isinstance(x, np.ndarray):
        out = np.empty_like(x)
        _gelu_kernel(approximate, "forward", "cpu")(x, out)
        return out
    return _gelu_kernel(approximate, "forward")(x)


def gelu_backward(grad, x, approximate: str):
    """dGELU/dx · grad in one elementwise kernel, recomputing tanh / Φ from x (nothing saved)."""
    if isinstance(x, np.ndarray):
        dx = np.empty_like(x)
        grad = np.asarray(grad, dtype=x.dtype)
        _gelu_kernel(approximate, "backward", "cpu")(grad if grad.flags.c_contiguous else grad.copy(), x, dx)
        return dx
    return _gelu_kernel(approximate, "backward")(grad, x)
