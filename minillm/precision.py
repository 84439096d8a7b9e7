"""Matmul precision: TF32 for float32 products, and autocast to bf16/fp16 (mixed precision).

Two switches, with PyTorch's names:

    mm.set_float32_matmul_precision("high")     # float32 products on TF32 tensor cores
    mm.set_float32_matmul_precision("highest")  # plain float32 (the default)

    with mm.autocast("bf16"):                   # or "fp16" (then use optim.GradScaler)
        loss = F.cross_entropy(model(x), y)
    loss.backward()

TF32 keeps float32 in and out of every product but rounds the operands to a
10-bit mantissa (like fp16's) inside the tensor cores, accumulating in float32:
relative error about 1e-3 per product instead of 1e-7, at ~8x the speed.

Inside ``autocast`` the matrix products (``linear``, ``matmul``, the flash
attention kernels) cast their float32 operands to bf16 or fp16 and run on the
tensor cores, accumulating in float32 and returning float32 (the score-matrix
attention path runs on TF32 tensor cores instead: ops/attention.py says why). Everything else (layer-norm
statistics, softmax, cross-entropy, the loss, GELU, the optimizer) runs as
before in float32, and the parameters stay float32 ("master weights"): a
product casts the weight on use, and the weight's gradient comes back in
float32. The products save their cast operands for backward (half the bytes
of float32), and backward runs in the same precision as forward, whether or
not it is called inside the ``with`` block.

bf16 has float32's exponent range, so gradients neither overflow nor underflow
and it needs no loss scaling; fp16 has 5 exponent bits (smallest normal
6.1e-5, largest 65504), so small gradients flush to zero unless the loss is
scaled up first: ``optim.GradScaler``.

autocast runs on the GPU only (cuBLAS does the reduced products); on the CPU
it is an error, as is an autocast product between CPU arrays.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import numpy as np

from . import backend

FLOAT32_MATMUL_PRECISIONS = ("highest", "high")
_float32_matmul_precision = "highest"
_autocast_dtype: np.dtype | None = None

# the names --precision and autocast accept for each reduced dtype
_REDUCED_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                  "half": "float16"}


@functools.lru_cache(maxsize=None)
def bfloat16() -> np.dtype:
    """NumPy's bfloat16 dtype, from ``ml_dtypes`` (the ``gpu`` extra; CuPy uses the same one)."""
    try:
        import ml_dtypes  # noqa: PLC0415
    except ImportError as error:  # pragma: no cover - installed with cupy
        raise RuntimeError("bf16 needs the ml_dtypes package (pip install 'minillm[gpu]')") from error
    return np.dtype(ml_dtypes.bfloat16)


def reduced_dtype(name) -> np.dtype:
    """The dtype for "bf16"/"bfloat16" or "fp16"/"float16" (or such a dtype itself)."""
    key = str(getattr(name, "name", name)).lower()
    if key not in _REDUCED_NAMES:
        raise ValueError(f"autocast dtype must be 'bf16' or 'fp16', got {name!r}")
    return bfloat16() if _REDUCED_NAMES[key] == "bfloat16" else np.dtype(np.float16)


# ---------------------------------------------------------------- TF32


def set_float32_matmul_precision(precision: str) -> None:
    """"highest": float32 products in full float32 (default); "high": on TF32 tensor cores.

    Applies to every float32 product minillm runs on a GPU from now on (its own
    cuBLAS calls read this switch each time) and to CuPy's own ``matmul``/``dot``.
    On the CPU it changes nothing (NumPy has no TF32).
    """
    global _float32_matmul_precision
    if precision not in FLOAT32_MATMUL_PRECISIONS:
        raise ValueError(f"float32 matmul precision must be one of {FLOAT32_MATMUL_PRECISIONS}, got {precision!r}")
    _float32_matmul_precision = precision
    _set_cupy_compute_type(precision == "high")


def get_float32_matmul_precision() -> str:
    return _float32_matmul_precision


def tf32_enabled() -> bool:
    return _float32_matmul_precision == "high"


def _set_cupy_compute_type(tf32: bool) -> None:
    """The one place that touches CuPy's private compute-type switch (``cupy._core``), so that
    CuPy's own float32 ``matmul``/``dot`` follow the same setting. CuPy otherwise reads
    ``CUPY_TF32`` once, at its first float32 product."""
    cp = backend._import_cupy()
    if cp is None:
        return
    try:
        linalg = cp._core._routines_linalg
        setter = getattr(cp._core, "set_compute_type", None) or linalg.set_compute_type
        mode = linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT
    except AttributeError:  # a CuPy without this private API: minillm's own products still follow the switch
        return
    setter(cp.float32, mode)


# ---------------------------------------------------------------- autocast


@contextlib.contextmanager
def autocast(dtype="bf16", enabled: bool = True) -> Iterator[None]:
    """Within this block, matrix products run in ``dtype`` ("bf16" or "fp16") on the GPU.

    See the module docstring. ``enabled=False`` makes it a no-op (handy for a
    ``--precision`` switch). Raises RuntimeError where there is no GPU.
    """
    global _autocast_dtype
    if not enabled:
        yield
        return
    reduced = reduced_dtype(dtype)
    if not backend.cuda_available():
        raise RuntimeError(
            "autocast runs matrix products in bf16/fp16 on a GPU, and no GPU is available: "
            "train in fp32 on the CPU"
        )
    previous, _autocast_dtype = _autocast_dtype, reduced
    try:
        yield
    finally:
        _autocast_dtype = previous


def autocast_dtype() -> np.dtype | None:
    """The reduced dtype of the enclosing ``autocast`` block, or None outside one."""
    return _autocast_dtype


def autocast_operands(*arrays):
    """The operands of a matrix product as it should run now: under autocast, float32 arrays
    cast to the reduced dtype (arrays already in it are kept); otherwise unchanged.

    Raises ValueError for CPU arrays under autocast (reduced products are GPU-only).
    """
    reduced = _autocast_dtype
    if reduced is None:
        return arrays
    out = []
    for a in arrays:
        if isinstance(a, np.ndarray):
            raise ValueError("autocast: this product's tensors are on the CPU; autocast runs on the GPU only")
        out.append(a.astype(reduced) if a.dtype == np.float32 else a)
    return tuple(out)


# ---------------------------------------------------------------- one switch for --precision

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def check_precision(precision: str, device: str) -> str:
    """Validate a ``--precision`` value for a device: any of PRECISIONS on a GPU, only fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and str(device).startswith("cpu"):
        raise ValueError(f"precision {precision} needs a GPU (--device cuda); on the CPU only fp32 is available")
    return precision


@contextlib.contextmanager
def use_precision(precision: str) -> Iterator[None]:
    """Run the block in one of PRECISIONS: fp32 (nothing changes), tf32 (float32 products on TF32
    tensor cores), bf16 or fp16 (``autocast``). The previous TF32 setting is restored after."""
    check_precision(precision, "cuda")
    previous = get_float32_matmul_precision()
    if precision == "tf32":
        set_float32_matmul_precision("high")
    try:
        with autocast(precision, enabled=precision in ("bf16", "fp16")):
            yield
    finally:
        if precision == "tf32":
            set_float32_matmul_precision(previous)
