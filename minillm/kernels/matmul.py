"""Matrix products on the GPU straight through cuBLAS ``GemmEx`` (the kernels behind ops/matmul.py).

Why not ``cupy.matmul``: for 3-D operands it upcasts fp16 to fp32 (no tensor
cores) and rejects bf16; a transposed view is copied before the product; and
it cannot accumulate into an existing array. Here every product is one call of
``cublasGemmEx`` (2-D) or ``cublasGemmStridedBatchedEx`` (batched), with

- operands float32, float64, float16 or bf16, read in place: a transpose is a
  flag (``trans_a``/``trans_b``), a row stride is a leading dimension, a batch
  axis of size 1 is broadcast with stride 0;
- accumulation in float32 (float64 for float64), the output in any of those
  dtypes (bf16 x bf16 -> float32 under autocast);
- float32 on TF32 tensor cores when ``tf32`` (``mm.set_float32_matmul_precision``);
- ``alpha`` folded in and ``accumulate`` adding into ``out`` (beta = 1).

The calls go through ``ctypes`` to the libcublas that CuPy loaded, on CuPy's
handle and current stream. That also works inside CUDA-graph stream capture,
where CuPy's own cuBLAS wrappers refuse to run (see ``prepare_capture``).

Row-major C (m, n) = op(A) op(B) is computed as the column-major product
Cᵀ = op(B)ᵀ op(A)ᵀ: a row-major (r, c) array read column-major is its
transpose, so no data moves.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

_CUDA_TYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}   # cudaDataType_t
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32, _COMPUTE_64F = 68, 77, 70          # cublasComputeType_t
_GEMM_DEFAULT = -1                                                       # cublasGemmAlgo_t
_OP_N, _OP_T = 0, 1


@functools.lru_cache(maxsize=None)
def _cublas():
    """The libcublas CuPy uses (found among the libraries this process mapped), with signatures."""
    import cupy  # noqa: PLC0415

    cupy.cuda.device.get_cublas_handle()          # makes sure CuPy has loaded cuBLAS
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps
                        if "/libcublas.so" in line and "libcublasLt" not in line})
    lib = ctypes.CDLL(paths[0]) if paths else ctypes.CDLL("libcublas.so")
    p, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    lib.cublasGemmEx.argtypes = [p, i, i, i, i, i, p, p, i, i, p, i, i, p, p, i, i, i, i]
    lib.cublasGemmStridedBatchedEx.argtypes = [p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll, i, i, i]
    lib.cublasSetStream_v2.argtypes = [p, p]
    lib.cublasGetStream_v2.argtypes = [p, ctypes.POINTER(ctypes.c_void_p)]
    lib.cublasSetWorkspace_v2.argtypes = [p, p, ctypes.c_size_t]
    for name in ("cublasGemmEx", "cublasGemmStridedBatchedEx", "cublasSetStream_v2", "cublasGetStream_v2",
                 "cublasSetWorkspace_v2"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


def _use_current_stream(lib, handle) -> None:
    """Point CuPy's cuBLAS handle at the current stream, if it is not already there.

    Only when it changes: ``cublasSetStream`` also resets the handle's workspace to
    cuBLAS's own pool, which would undo ``prepare_capture``'s fixed workspace in the
    middle of a CUDA-graph capture (cuBLAS would then allocate inside the graph)."""
    import cupy  # noqa: PLC0415

    current = ctypes.c_void_p()
    _check(lib.cublasGetStream_v2(handle, ctypes.byref(current)), "cublasGetStream")
    stream = cupy.cuda.get_current_stream().ptr
    if (current.value or 0) != stream:
        _check(lib.cublasSetStream_v2(handle, stream), "cublasSetStream")


def _layout(x):
    """(leading dimension, batch stride) in elements of a (rows, cols) or (batch, rows, cols) array
    whose rows are contiguous, or None when it must be copied first."""
    item = x.itemsize
    rows, cols = x.shape[-2], x.shape[-1]
    if cols > 1 and x.strides[-1] != item:
        return None
    ld = x.strides[-2] // item if rows > 1 else max(cols, 1)
    if ld < max(cols, 1) or x.strides[-2] % item:
        return None
    batch_stride = 0
    if x.ndim == 3 and x.shape[0] > 1:
        if x.strides[0] % item:
            return None
        batch_stride = x.strides[0] // item
    return ld, batch_stride


def _contiguous_rows(x):
    import cupy  # noqa: PLC0415

    layout = _layout(x)
    if layout is None:
        x = cupy.ascontiguousarray(x)
        layout = _layout(x)
    return x, layout


def gemm(a, b, trans_a: bool = False, trans_b: bool = False, out=None, out_dtype=None,
         alpha: float = 1.0, accumulate: bool = False, tf32: bool = False):
    """C = alpha · op(A) op(B) (+ C when ``accumulate``) on CuPy arrays; returns C.

    A is (m, k) or (batch, m, k) (stored (k, m) when ``trans_a``), B likewise
    (k, n) / (n, k); 2-D operands or a batch of 1 broadcast over the other's
    batch. C is (m, n) or (batch, m, n), of ``out_dtype`` (default A's dtype),
    or ``out`` (rows contiguous; with ``accumulate`` its content is added to).
    A and B must share a dtype.
    """
    import cupy  # noqa: PLC0415

    if a.dtype != b.dtype:
        raise TypeError(f"gemm: operands of different dtypes {a.dtype} and {b.dtype}")
    if a.dtype.name not in _CUDA_TYPES:
        raise TypeError(f"gemm: unsupported dtype {a.dtype}")
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    k_b, n = (b.shape[-1], b.shape[-2]) if trans_b else (b.shape[-2], b.shape[-1])
    if k != k_b:
        raise ValueError(f"gemm: inner dimensions differ ({a.shape}, trans {trans_a}; {b.shape}, trans {trans_b})")
    batch_a = a.shape[0] if a.ndim == 3 else 1
    batch_b = b.shape[0] if b.ndim == 3 else 1
    if batch_a != batch_b and 1 not in (batch_a, batch_b):
        raise ValueError(f"gemm: batch sizes {batch_a} and {batch_b} do not broadcast")
    batch = max(batch_a, batch_b)
    batched = a.ndim == 3 or b.ndim == 3
    out_shape = (batch, m, n) if batched else (m, n)
    out_dtype = np.dtype(out_dtype or (out.dtype if out is not None else a.dtype))
    if out is None:
        if accumulate:
            raise ValueError("gemm: accumulate needs out")
        out = cupy.empty(out_shape, dtype=out_dtype)
    elif out.shape != out_shape:
        raise ValueError(f"gemm: out has shape {out.shape}, expected {out_shape}")
    if out.dtype.name not in _CUDA_TYPES:
        raise TypeError(f"gemm: unsupported output dtype {out.dtype}")
    if out.size == 0:
        return out
    if k == 0:
        if not accumulate:
            out.fill(0)
        return out
    out_layout = _layout(out)
    if out_layout is None or (batched and batch > 1 and out_layout[1] == 0):
        raise ValueError("gemm: out needs contiguous rows")
    a, (lda, stride_a) = _contiguous_rows(a)
    b, (ldb, stride_b) = _contiguous_rows(b)
    ldc, stride_c = out_layout

    lib = _cublas()
    handle = cupy.cuda.device.get_cublas_handle()
    _use_current_stream(lib, handle)
    if a.dtype == np.float64:
        compute, scalar = _COMPUTE_64F, ctypes.c_double
    else:
        compute, scalar = (_COMPUTE_32F_FAST_TF32 if tf32 and a.dtype == np.float32 else _COMPUTE_32F), ctypes.c_float
    alpha_c, beta_c = scalar(alpha), scalar(1.0 if accumulate else 0.0)
    in_type, out_type = _CUDA_TYPES[a.dtype.name], _CUDA_TYPES[out.dtype.name]
    op_a, op_b = (_OP_T if trans_a else _OP_N), (_OP_T if trans_b else _OP_N)
    # column-major: Cᵀ (n, m) = op(B)ᵀ (n, k) · op(A)ᵀ (k, m)
    if not batched:
        status = lib.cublasGemmEx(handle, op_b, op_a, n, m, k, ctypes.byref(alpha_c),
                                  b.data.ptr, in_type, ldb, a.data.ptr, in_type, lda,
                                  ctypes.byref(beta_c), out.data.ptr, out_type, ldc, compute, _GEMM_DEFAULT)
        _check(status, "cublasGemmEx")
    else:
        status = lib.cublasGemmStridedBatchedEx(
            handle, op_b, op_a, n, m, k, ctypes.byref(alpha_c),
            b.data.ptr, in_type, ldb, stride_b if batch_b > 1 else 0,
            a.data.ptr, in_type, lda, stride_a if batch_a > 1 else 0,
            ctypes.byref(beta_c), out.data.ptr, out_type, ldc, stride_c, batch, compute, _GEMM_DEFAULT)
        _check(status, "cublasGemmStridedBatchedEx")
    return out


def matmul(a, b, trans_a: bool = False, trans_b: bool = False, out_dtype=None, tf32: bool = False):
    """``op(a) @ op(b)`` for CuPy arrays of any number of dimensions with NumPy's broadcasting
    of the leading (batch) axes; one cuBLAS call. 1-D operands are not handled (the op does)."""
    import cupy  # noqa: PLC0415

    if a.ndim == 2 and b.ndim == 2:                               # the linear layers: no broadcasting to work out
        return gemm(a, b, trans_a, trans_b, out_dtype=out_dtype, tf32=tf32)
    batch_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if not batch_shape:
        return gemm(a, b, trans_a, trans_b, out_dtype=out_dtype, tf32=tf32)

    def as_3d(x):
        if x.ndim == 2 or int(np.prod(x.shape[:-2])) == 1:
            return x.reshape(x.shape[-2:])                      # one matrix: broadcast with stride 0
        if x.shape[:-2] != batch_shape:
            x = cupy.broadcast_to(x, batch_shape + x.shape[-2:])
        try:
            return x.reshape(-1, *x.shape[-2:])                  # a view when the batch axes allow
        except ValueError:  # pragma: no cover - CuPy copies instead of raising
            return cupy.ascontiguousarray(x).reshape(-1, *x.shape[-2:])

    a3, b3 = as_3d(a), as_3d(b)
    if a3.ndim == 2 and b3.ndim == 2:                             # every batch the same product
        c = gemm(a3, b3, trans_a, trans_b, out_dtype=out_dtype, tf32=tf32)
        return cupy.broadcast_to(c, batch_shape + c.shape).copy()
    c = gemm(a3, b3, trans_a, trans_b, out_dtype=out_dtype, tf32=tf32)
    return c.reshape(batch_shape + c.shape[-2:])


# cuBLAS's fast tensor-core kernels want every row to start at a 16-byte boundary. GPT-2's
# vocabulary of 50,257 is not a multiple of 8 (nor of 4): measured on an H200
# (benchmarks/gpu_quick.py head), the LM head's three products take 6.7 + 4.6 + 4.3 ms in bf16 at
# 50,257 columns and 1.0 + 0.8 + 0.8 ms at 50,264; in TF32 4.9 + 4.9 + 5.4 against 1.7 + 1.6 +
# 3.0 ms (plain float32, on the CUDA cores, does not care: 12.3 + 12.8 + 11.8 either way). So a
# linear layer whose product runs on the tensor cores (16-bit, or float32 in TF32) and whose output
# width is not a multiple of 8 multiplies with its weight padded by zero rows (its output gradient
# by zero columns) to the next multiple of 8, and hands on a view of the real columns.
TENSOR_CORE_ROWS = 8


def tensor_core_width(features: int, dtype, tf32: bool = False) -> int:
    """``features`` rounded up to a multiple of 8 for products on the tensor cores: 16-bit dtypes,
    or float32 with ``tf32``; unchanged otherwise."""
    dtype = np.dtype(dtype)
    on_tensor_cores = dtype.itemsize == 2 or (tf32 and dtype == np.float32)
    if not on_tensor_cores or features % TENSOR_CORE_ROWS == 0:
        return features
    return -(-features // TENSOR_CORE_ROWS) * TENSOR_CORE_ROWS


def zero_padded(a, rows: int | None = None, columns: int | None = None, dtype=None):
    """A copy of the 2-D CuPy array ``a`` (cast to ``dtype``) with zero rows / columns appended up
    to ``rows`` x ``columns``: one pass writing the copy, the padding zeroed on its own."""
    import cupy  # noqa: PLC0415

    r, c = a.shape
    rows, columns = rows or r, columns or c
    out = cupy.empty((rows, columns), dtype=dtype or a.dtype)
    out[:r, :c] = a
    if rows > r:
        out[r:] = 0
    if columns > c:
        out[:r, c:] = 0
    return out


_capture_workspaces: dict = {}


def prepare_capture(workspace_bytes: int = 32 << 20) -> None:
    """Before CUDA-graph capture on the current stream: give cuBLAS that stream and a fixed
    workspace (a capture may not allocate one). The workspace stays set on CuPy's handle for
    later calls too, so it is allocated once per device and never freed."""
    import cupy  # noqa: PLC0415

    lib = _cublas()
    handle = cupy.cuda.device.get_cublas_handle()
    device = cupy.cuda.Device().id
    if device not in _capture_workspaces:
        _capture_workspaces[device] = cupy.empty(workspace_bytes, dtype=cupy.uint8)
    workspace = _capture_workspaces[device]
    _check(lib.cublasSetStream_v2(handle, cupy.cuda.get_current_stream().ptr), "cublasSetStream")
    _check(lib.cublasSetWorkspace_v2(handle, workspace.data.ptr, workspace.nbytes), "cublasSetWorkspace")
