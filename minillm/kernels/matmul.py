"""Matrix products straight through the BLAS: cuBLAS ``GemmEx`` on the GPU, CBLAS ``?gemm`` on the
CPU (the kernels behind ops/matmul.py; the CPU part is at the end of this file).

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
import threading

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


def _product_shape(a, b, trans_a: bool, trans_b: bool, what: str) -> tuple[int, int, int]:
    """(m, k, n) of op(A) op(B) for matrices or stacks of them (the last two axes); a ValueError
    naming ``what`` when the inner dimensions differ."""
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    k_b, n = (b.shape[-1], b.shape[-2]) if trans_b else (b.shape[-2], b.shape[-1])
    if k != k_b:
        raise ValueError(f"{what}: inner dimensions differ ({a.shape}, trans {trans_a}; {b.shape}, trans {trans_b})")
    return m, k, n


def _nothing_to_multiply(out, k: int, accumulate: bool) -> bool:
    """True when the product needs no BLAS call: ``out`` is empty, or the inner axis is (then
    ``out`` is zeroed, or left as it is when accumulating)."""
    if out.size == 0:
        return True
    if k == 0:
        if not accumulate:
            out.fill(0)
        return True
    return False


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
    m, k, n = _product_shape(a, b, trans_a, trans_b, "gemm")
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
    if _nothing_to_multiply(out, k, accumulate):
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


# ---------------------------------------------------------------- the CPU: CBLAS through ctypes
#
# minillm shares a large product out between its own threads (ops/common.py, ``cpu_matmul``), each
# thread's block one single-threaded BLAS call. ``cpu_gemm`` makes that call through ``ctypes``
# (the GIL is released while it runs), into
#
# - Intel MKL's ``libmkl_rt`` when it is installed (``pip install minillm[mkl]``: the wheel puts it
#   under ``sys.prefix/lib``), switched to its sequential threading layer, so every call runs on
#   the thread that makes it. On this project's Xeon its kernels run the linear layers' products
#   8-11% faster than OpenBLAS's, the training step ~10% (docs/performance.md, item 19). An MKL
#   that something else in the process loaded first is left alone;
# - else the OpenBLAS that NumPy loaded (``backend.numpy_openblas``), whose thread count
#   ``backend.blas_threads`` sets: the very kernels ``np.matmul`` calls, the same results.
#
# ``MINILLM_BLAS`` chooses: ``mkl``, ``openblas`` (NumPy's), ``numpy`` (no ctypes at all: plain
# ``np.matmul``) or the path of a CBLAS library. Nothing found (no /proc/self/maps, another BLAS):
# ``cpu_gemm`` computes with ``np.matmul``; loading never raises.
#
# Like cuBLAS above, CBLAS reads an operand in place when its rows (or, for a transposed view, its
# columns) are contiguous: a transpose is a flag, a row stride a leading dimension.

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112          # CBLAS_ORDER, CBLAS_TRANSPOSE
_MKL_THREADING_SEQUENTIAL = 1                          # MKL_Set_Threading_Layer's argument
_CPU_GEMM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class CpuBlas:
    """One CBLAS library bound through ctypes: ``gemm[dtype]`` (``cblas_sgemm`` / ``cblas_dgemm``).

    ``name`` says which (``minillm bench train`` prints it); ``single_threaded`` is True when every
    call runs on the calling thread whatever else happens (MKL's sequential layer), False for an
    OpenBLAS whose own threads ``backend.blas_threads`` must hold at one inside minillm's splits.
    ``gemm_batch[dtype]`` (``cblas_?gemm_batch_strided``, when ``batch_names`` are given): a stack
    of products in one call, for ``cpu_gemm_batched``.
    """

    def __init__(self, lib, name: str, gemm_names: tuple[str, str], int_bits: int, single_threaded: bool,
                 path: str = "", batch_names: tuple[str, str] | None = None) -> None:
        self.lib, self.name, self.single_threaded, self.path = lib, name, single_threaded, path
        self.max_int = 2 ** (int_bits - 1) - 1
        index = ctypes.c_int64 if int_bits == 64 else ctypes.c_int32
        p, e = ctypes.c_void_p, ctypes.c_int         # CBLAS's enums are C ints
        self.gemm, self.gemm_batch = {}, {}
        for dtype, scalar, symbol, batch_symbol in zip(_CPU_GEMM_DTYPES, (ctypes.c_float, ctypes.c_double),
                                                       gemm_names, batch_names or (None, None)):
            function = getattr(lib, symbol)
            # (order, trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc)
            function.argtypes = [e, e, e, index, index, index, scalar, p, index, p, index, scalar, p, index]
            function.restype = None
            self.gemm[dtype] = function
            if batch_symbol is not None:
                function = getattr(lib, batch_symbol)
                # (order, trans_a, trans_b, m, n, k, alpha, A, lda, stride_a, B, ldb, stride_b, beta,
                #  C, ldc, stride_c, batch)
                function.argtypes = [e, e, e, index, index, index, scalar, p, index, index, p, index, index,
                                     scalar, p, index, index, index]
                function.restype = None
                self.gemm_batch[dtype] = function


def _mkl(path_or_name: str) -> CpuBlas | None:
    """MKL's single dynamic library (``libmkl_rt``), set to its sequential layer, or None."""
    lib = ctypes.CDLL(path_or_name)
    if not hasattr(lib, "MKL_Set_Threading_Layer"):
        return None
    lib.MKL_Set_Threading_Layer.argtypes, lib.MKL_Set_Threading_Layer.restype = [ctypes.c_int], ctypes.c_int
    # Fails (returns another layer) when MKL was already running in this process with threads:
    # then minillm's threads would each start MKL's too, more threads than cores. Not used then.
    if lib.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL) != _MKL_THREADING_SEQUENTIAL:
        return None
    version = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(version, len(version))
    words = version.value.decode(errors="replace").split()
    number = next((w.split("-")[0] for w in words if w[:1].isdigit()), "")     # "2026.2-Product"
    suffix, bits = "_64", 64                                        # 64-bit integers, whatever the
    if not hasattr(lib, "cblas_sgemm_64"):                          # interface layer (MKL 2023+)
        suffix, bits = "", 32
    names = (f"cblas_sgemm{suffix}", f"cblas_dgemm{suffix}")
    batch = (f"cblas_sgemm_batch_strided{suffix}", f"cblas_dgemm_batch_strided{suffix}")
    return CpuBlas(lib, f"MKL {number} (sequential)".replace("  ", " "), names, bits, True, path_or_name,
                   batch if all(hasattr(lib, name) for name in batch) else None)


def _mkl_candidates() -> list[str]:
    """MKL's runtime library: under this environment's lib/ (the PyPI wheel), then the loader's path.

    A copy whose own sub-libraries (core, sequential layer) are not beside it is skipped: MKL
    would stop the process ("MKL FATAL ERROR: cannot load ...") at its first call."""
    import ctypes.util  # noqa: PLC0415
    import glob  # noqa: PLC0415
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    found = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    on_loader_path = None if found else ctypes.util.find_library("mkl_rt")    # (runs ldconfig: only if need be)
    if on_loader_path:
        found.append(on_loader_path)
    usable = []
    for path in found:
        folder = os.path.dirname(path)
        if folder and not all(glob.glob(os.path.join(folder, f"lib{part}.so*"))
                              for part in ("mkl_core", "mkl_sequential")):
            continue
        usable.append(path)
    return usable


def _mapped(fragment: str) -> bool:
    """Whether a library whose path contains ``fragment`` is loaded in this process (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return any(fragment in line for line in maps)
    except OSError:
        return False


def _numpy_openblas() -> CpuBlas | None:
    """The CBLAS of the OpenBLAS NumPy loaded (``backend.numpy_openblas``), or None."""
    from .. import backend  # noqa: PLC0415

    found = backend.numpy_openblas()
    if found is None:
        return None
    lib, prefix, suffix = found
    cblas = "scipy_cblas" if prefix.startswith("scipy") else "cblas"     # scipy_cblas_sgemm64_, cblas_sgemm
    names = (f"{cblas}_sgemm{suffix}", f"{cblas}_dgemm{suffix}")
    if not all(hasattr(lib, name) for name in names):
        return None
    config = getattr(lib, f"{prefix}_get_config{suffix}", None)
    version = ""
    if config is not None:
        config.restype = ctypes.c_char_p
        words = (config() or b"").decode(errors="replace").split()
        version = " " + words[1] if len(words) > 1 else ""
    return CpuBlas(lib, f"OpenBLAS{version} (NumPy's)", names, 64 if suffix.startswith("64") else 32, False)


def _cblas_at(path: str) -> CpuBlas | None:
    """A CBLAS library named by path: MKL, or one with the OpenBLAS/reference CBLAS symbols."""
    blas = _mkl(path)
    if blas is not None:
        return blas
    lib = ctypes.CDLL(path)
    for names, bits in ((("cblas_sgemm64_", "cblas_dgemm64_"), 64), (("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_"), 64),
                        (("cblas_sgemm", "cblas_dgemm"), 32)):
        if all(hasattr(lib, name) for name in names):
            return CpuBlas(lib, f"CBLAS {path}", names, bits, False, path)
    return None


_cpu_blas_found: list = []                 # [the CpuBlas or None] once looked up
_cpu_blas_lock = threading.Lock()          # the first lookup may come from two threads' products at once


def cpu_blas() -> CpuBlas | None:
    """The CBLAS that ``cpu_gemm`` calls (MKL, else NumPy's OpenBLAS; ``MINILLM_BLAS`` overrides),
    or None: ``cpu_gemm`` then runs ``np.matmul``. Looked up once (``find_cpu_blas``)."""
    if not _cpu_blas_found:
        with _cpu_blas_lock:
            if not _cpu_blas_found:
                _cpu_blas_found.append(find_cpu_blas())
    return _cpu_blas_found[0]


def find_cpu_blas() -> CpuBlas | None:
    """Look for the CBLAS library afresh (``cpu_blas``'s search); never raises (a library that
    fails to load is skipped with a warning when ``MINILLM_BLAS`` named it)."""
    import os  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    choice = os.environ.get("MINILLM_BLAS", "").strip()
    try:
        if choice.lower() == "numpy":
            return None
        if choice.lower() == "openblas":
            return _numpy_openblas()
        if choice and choice.lower() != "mkl":
            blas = _cblas_at(choice)
            if blas is not None:
                return blas
            warnings.warn(f"MINILLM_BLAS={choice!r}: no CBLAS there; using the default search", stacklevel=2)
    except (OSError, AttributeError, ValueError) as error:
        warnings.warn(f"MINILLM_BLAS={choice!r} could not be loaded ({error}); using the default search", stacklevel=2)
    # An MKL this process loaded already (NumPy built against it, say) is left alone: switching
    # its threading layer would make the other user's products single-threaded too.
    for path in ([] if _mapped("libmkl_rt") else _mkl_candidates()):
        try:
            blas = _mkl(path)
        except (OSError, AttributeError):
            continue
        if blas is not None:
            return blas
    if choice.lower() == "mkl":
        warnings.warn("MINILLM_BLAS=mkl: MKL not found (pip install minillm[mkl]); using NumPy's OpenBLAS",
                      stacklevel=2)
    try:
        return _numpy_openblas()
    except (OSError, AttributeError):
        return None


def cpu_blas_name() -> str:
    """Which library the CPU's products run on: 'MKL 2026.2 (sequential)', 'OpenBLAS 0.3.31 (NumPy's)',
    or 'NumPy matmul' when no CBLAS could be bound."""
    blas = cpu_blas()
    return blas.name if blas is not None else "NumPy matmul"


def cpu_blas_single_threaded() -> bool:
    """True when every ``cpu_gemm`` runs on its calling thread alone (MKL's sequential layer):
    minillm's threads can then share products out with no BLAS thread count to hold down."""
    blas = cpu_blas()
    return blas is not None and blas.single_threaded


def _row_major_ld(x) -> int | None:
    """The leading dimension (row stride in elements) of a 2-D array whose rows are contiguous,
    or None when they are not."""
    return _leading_dimension(*x.shape, *x.strides, x.itemsize)


def _leading_dimension(rows: int, cols: int, row_stride: int, col_stride: int, item: int) -> int | None:
    """``_row_major_ld`` from a matrix's shape and strides (bytes)."""
    if cols > 1 and col_stride != item:
        return None
    if rows <= 1:
        return max(cols, 1)
    if row_stride % item or row_stride // item < max(cols, 1):
        return None
    return row_stride // item


def _cpu_operand(x, transposed: bool):
    """(array, transposed, ld) reading op(x) in place: x row-major as it is, or x a transposed view
    of a row-major array (columns contiguous: read that array with the flag flipped); else a copy."""
    if x.flags.aligned:
        ld = _row_major_ld(x)
        if ld is not None:
            return x, transposed, ld
        ld = _row_major_ld(x.T)
        if ld is not None:
            return x.T, not transposed, ld
    x = np.ascontiguousarray(x)
    return x, transposed, max(x.shape[1], 1)


def cpu_gemm(a: np.ndarray, b: np.ndarray, trans_a: bool = False, trans_b: bool = False, out=None,
             alpha: float = 1.0, accumulate: bool = False) -> np.ndarray:
    """C = alpha · op(A) op(B) (+ C when ``accumulate``) on 2-D NumPy arrays; returns C.

    ``gemm``'s contract on the CPU: A is (m, k) (stored (k, m) when ``trans_a``), B (k, n) (stored
    (n, k) when ``trans_b``), both float32 or both float64; C is (m, n) of their dtype, or ``out``
    (rows contiguous, any row stride; with ``accumulate`` its content is added to: beta = 1). One
    CBLAS call on the calling thread (``cpu_blas``) reading A and B in place: a transposed view is
    a flag, rows with a stride a leading dimension; other layouts, and operands that overlap
    ``out``, are copied first. With no CBLAS bound, the same through ``np.matmul``.
    """
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        raise TypeError(f"cpu_gemm: operands must be NumPy arrays, got {type(a).__name__} and {type(b).__name__}")
    if a.dtype != b.dtype:
        raise TypeError(f"cpu_gemm: operands of different dtypes {a.dtype} and {b.dtype}")
    if a.dtype not in _CPU_GEMM_DTYPES:
        raise TypeError(f"cpu_gemm: unsupported dtype {a.dtype} (float32 or float64)")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"cpu_gemm: operands must be 2-D, got shapes {a.shape} and {b.shape}")
    m, k, n = _product_shape(a, b, trans_a, trans_b, "cpu_gemm")
    if out is None:
        if accumulate:
            raise ValueError("cpu_gemm: accumulate needs out")
        out = np.empty((m, n), dtype=a.dtype)
    elif not isinstance(out, np.ndarray) or out.dtype != a.dtype:
        raise TypeError(f"cpu_gemm: out must be a NumPy array of {a.dtype}, got {getattr(out, 'dtype', type(out))}")
    elif out.shape != (m, n):
        raise ValueError(f"cpu_gemm: out has shape {out.shape}, expected {(m, n)}")
    if _nothing_to_multiply(out, k, accumulate):
        return out
    ldc = _row_major_ld(out) if out.flags.aligned and out.flags.writeable else None
    if ldc is None:
        raise ValueError("cpu_gemm: out needs contiguous, aligned, writeable rows")
    if np.may_share_memory(a, out):
        a = a.copy()
    if np.may_share_memory(b, out):
        b = b.copy()
    a, trans_a, lda = _cpu_operand(a, trans_a)
    b, trans_b, ldb = _cpu_operand(b, trans_b)
    blas = cpu_blas()
    if blas is None or max(m, n, k, lda, ldb, ldc) > blas.max_int:
        product = np.matmul(a.T if trans_a else a, b.T if trans_b else b)
        if alpha != 1.0:
            product *= alpha
        if accumulate:
            out += product
        else:
            out[...] = product
        return out
    blas.gemm[a.dtype](_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
                       m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data, ldb,
                       1.0 if accumulate else 0.0, out.ctypes.data, ldc)
    return out


def _matrix_layout(x) -> tuple[bool, int, int] | None:
    """(transposed, ld, batch stride) in elements for reading the matrices of a 3-D array in place:
    rows contiguous (not transposed) or columns contiguous (a transposed view); None otherwise."""
    item = x.itemsize
    if not x.flags.aligned or x.strides[0] % item or x.strides[0] < 0:
        return None
    (rows, cols), (row_stride, col_stride) = x.shape[1:], x.strides[1:]
    ld = _leading_dimension(rows, cols, row_stride, col_stride, item)
    if ld is not None:
        return False, ld, x.strides[0] // item
    ld = _leading_dimension(cols, rows, col_stride, row_stride, item)       # the transposed view's
    if ld is not None:
        return True, ld, x.strides[0] // item
    return None


def cpu_gemm_batched(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False) -> np.ndarray:
    """out[i] (+)= a[i] @ b[i] for stacks of matrices, a (n, m, k), b (n, k, n2), out (n, m, n2): the
    batch axis with any stride (0: one matrix for all), each matrix rows- or columns-contiguous
    (a transposed view is a flag). One ``cblas_?gemm_batch_strided`` call when the library is MKL
    (measured on attention's tiles, 8 x (128 x 64) · (64 x 128): 93 against 126 µs for
    ``np.matmul`` on OpenBLAS, one thread; OpenBLAS's own batched call was no faster than
    ``np.matmul``, so without MKL, and for other layouts, dtypes or overlapping operands, this is
    ``np.matmul``). ``accumulate`` adds the products into ``out`` (beta = 1). ``out``'s matrices must
    follow one another (a stride of at least rows x leading dimension) for the batched call."""
    blas = cpu_blas()
    function = None if blas is None else blas.gemm_batch.get(a.dtype)
    layouts = None
    if (function is not None and a.ndim == b.ndim == out.ndim == 3 and a.dtype == b.dtype == out.dtype
            and a.shape[0] == b.shape[0] == out.shape[0] and a.shape[2] == b.shape[1]
            and out.shape[1:] == (a.shape[1], b.shape[2]) and out.flags.writeable
            and not np.may_share_memory(a, out) and not np.may_share_memory(b, out)):
        layouts = _matrix_layout(a), _matrix_layout(b), _matrix_layout(out)
    n, m, k = a.shape
    n2 = b.shape[-1]
    # out's matrices one after another (MKL refuses interleaved ones, stride_c < ldc·m: the heads-last
    # output of attention's forward), not transposed
    if (layouts is None or None in layouts or layouts[2][0] or (n > 1 and layouts[2][2] < layouts[2][1] * m)
            or max(n, m, n2, k, *layouts[0][1:], *layouts[1][1:], *layouts[2][1:]) > blas.max_int):
        if accumulate:
            out += np.matmul(a, b)
        else:
            np.matmul(a, b, out=out)
        return out
    if _nothing_to_multiply(out, k, accumulate):
        return out
    (trans_a, lda, stride_a), (trans_b, ldb, stride_b), (_, ldc, stride_c) = layouts
    function(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n2, k, 1.0,
             a.ctypes.data, lda, stride_a, b.ctypes.data, ldb, stride_b, 1.0 if accumulate else 0.0,
             out.ctypes.data, ldc, stride_c, n)
    return out
