"""Array backends: NumPy on the CPU, CuPy on NVIDIA GPUs, the same code on both.

Every op receives raw arrays and asks ``array_module(x)`` which module to use;
that is the only backend-aware line an op may have. This file is the one
place that knows about devices, default dtypes, random numbers, and the (few)
fused CUDA kernels that the GPU hot paths select.

Devices are strings: ``"cpu"``, ``"cuda"`` (the current GPU, normalised to
``"cuda:0"``-style), ``"cuda:N"``. CuPy is imported lazily, so the package
imports and runs with no CuPy installed.

Dtype rule (one rule, everywhere): all floating-point tensor inputs of an op
must have the same dtype, or the op raises ``TypeError``. Python numbers and
non-tensor arrays taking part in an op are cast to the dtype of the tensor they
meet. Nothing is ever silently promoted to float64 inside a float32 model; to
mix, convert explicitly with ``t.to(dtype=...)``. New floating tensors built from
Python numbers or lists get the default dtype, float32; a NumPy array keeps
its own dtype (float64 data is how ``gradcheck`` gets float64).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from typing import Any

import numpy as np

DEFAULT_DTYPE = np.dtype(np.float32)
_default_dtype = DEFAULT_DTYPE

_cupy = None  # the cupy module once imported, False if unavailable


def _import_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: PLC0415 (lazy on purpose)

            cupy.cuda.runtime.getDeviceCount()
            _cupy = cupy
        except Exception:  # no cupy, no driver or no GPU
            _cupy = False
    return _cupy or None


def cuda_available() -> bool:
    """True when CuPy is installed and can see at least one GPU."""
    return _import_cupy() is not None


def cuda_device_count() -> int:
    cp = _import_cupy()
    return cp.cuda.runtime.getDeviceCount() if cp else 0


# ----------------------------------------------------------------- devices


def parse_device(device: Any) -> str:
    """Normalise a device spec: None/"cpu" -> "cpu", "cuda" -> "cuda:<current>", "cuda:N"."""
    if device is None:
        return "cpu"
    device = str(device).strip().lower()
    if device == "cpu":
        return "cpu"
    if device == "gpu":
        device = "cuda"
    if device == "cuda" or device.startswith("cuda:"):
        cp = _import_cupy()
        if cp is None:
            raise RuntimeError(
                f"device {device!r} requested but CUDA is not available: install the 'gpu' extra "
                "(pip install 'minillm[gpu]', i.e. cupy) on a machine with an NVIDIA GPU"
            )
        if device == "cuda":
            return f"cuda:{cp.cuda.runtime.getDevice()}"
        index = device[5:]
        if not index.isdigit():
            raise ValueError(f"bad device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        count = cp.cuda.runtime.getDeviceCount()
        if int(index) >= count:
            raise ValueError(f"device {device!r} does not exist: {count} GPU(s) visible")
        return f"cuda:{int(index)}"
    raise ValueError(f"bad device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def device_of(array) -> str:
    """The device an array lives on."""
    if type(array) is np.ndarray:  # the usual case first: the engine asks for every op's inputs
        return "cpu"
    dev = getattr(array, "device", None)
    if dev is not None and hasattr(dev, "id"):  # a CuPy array (NumPy's .device is the string "cpu")
        return f"cuda:{dev.id}"
    return "cpu"                                # NumPy scalars, Python numbers, ndarray subclasses


def array_module(x):
    """numpy or cupy, whichever owns ``x`` (micrograd-style code stays backend-free)."""
    if isinstance(x, np.ndarray) or _cupy in (None, False):
        return np
    if type(x) is _cupy.ndarray:  # most calls (every op asks): skip CuPy's general lookup
        return _cupy
    return _cupy.get_array_module(x)


def module_for(device: str):
    """The array module for a (normalised) device string."""
    return np if device == "cpu" else _import_cupy()


def device_context(device: str):
    """Context in which new arrays land on ``device`` (a no-op for the CPU)."""
    if device == "cpu":
        return contextlib.nullcontext()
    index = _checked_device_index.get(device)
    if index is None:
        normalised = parse_device(device)
        index = int(normalised[5:])
        if normalised == device:  # "cuda" (the current GPU, which can change) is never cached
            _checked_device_index[device] = index
    return _import_cupy().cuda.Device(index)


# "cuda:N" -> N for the device strings parse_device has checked: ops run in a device_context
# on the GPU, and parsing (a CUDA runtime call to count the GPUs) once per op call is host time
_checked_device_index: dict[str, int] = {}


def to_device(array, device: str):
    """Copy an array to a device (returns it unchanged if it already lives there)."""
    device = parse_device(device)
    if device_of(array) == device:
        return array
    if device == "cpu":
        return _cupy.asnumpy(array)
    with device_context(device):
        return _cupy.asarray(array)


def to_numpy(array) -> np.ndarray:
    if isinstance(array, (np.ndarray, np.generic)) or not _cupy:
        return np.asarray(array)
    return _cupy.asnumpy(array)


_ids_checked_on_host = False


@contextlib.contextmanager
def ids_checked_on_host():
    """Within this block the embedding's token ids and the loss's targets were range-checked
    on the host already (``minillm.train.graph_step.check_token_batch``), so the ops skip
    their own checks, which read a value back from the GPU. Two callers need it: a CUDA-graph
    capture (it records kernels and runs none, so nothing can be read back) and the pipeline's
    schedule (a sync there would stall the stages' overlap)."""
    global _ids_checked_on_host
    previous, _ids_checked_on_host = _ids_checked_on_host, True
    try:
        yield
    finally:
        _ids_checked_on_host = previous


def ids_checked() -> bool:
    """True inside ``ids_checked_on_host()``: ops skip their device-side id checks."""
    return _ids_checked_on_host


def synchronize(device: str = "cuda") -> None:
    """Wait for the GPU to finish queued work (for timing); a no-op on the CPU."""
    if device != "cpu" and cuda_available():
        _cupy.cuda.get_current_stream().synchronize()


def tune_cpu_allocator() -> bool:
    """Keep freed array memory in the process heap instead of returning it to the OS.

    NumPy allocates a fresh array for every temporary. glibc serves blocks above
    its mmap threshold (128 KiB, rising adaptively) with ``mmap`` and unmaps them
    on free, so the next temporary of that size page-faults all its pages in
    again (zeroed by the kernel). In a training step of a 6-layer, 384-wide
    model that is ~55,000 page faults and ~30% of the step's time. Raising the
    mmap threshold to 32 MiB and the trim threshold to 1 GiB lets temporaries
    reuse warm heap pages (measured: 1.35 -> 1.05 s per step on 2 cores).

    Process-wide and harmless to results (it changes where memory comes from,
    never what is computed); the Trainer and the ``minillm`` command call it.
    Returns False where it does not apply (not glibc).
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    _allocator_tuned = ok
    return ok


_allocator_tuned = False


def tune_cpu_threads() -> bool:
    """Have NumPy's BLAS run single-threaded from now on; minillm's CPU ops share out their
    work between threads themselves (``ops/common.py``: products in blocks, elementwise
    chains in pieces, each thread running a single-threaded BLAS).

    Mixing the two costs: after each call it splits, OpenBLAS keeps its worker threads
    spinning for a while, and they take the cores that minillm's threads want next
    (measured, 6 layers x 384, T=256, B=8: 866 -> 757 ms per step with every product
    of 2^22 multiply-adds or more split by minillm and the BLAS single-threaded; a
    4 x 128 model: 47 -> 50 ms). The Trainer calls it on the CPU. Without it (e.g. when
    generating: batch-1 decoding is 8% faster with the BLAS's threads), minillm splits
    only products of 2^26 or more. Process-wide; returns False where the BLAS's threads
    cannot be set.
    """
    global _cpu_threads_tuned
    functions = _openblas_thread_functions()
    if functions is None:
        return False
    functions[1](1)
    _cpu_threads_tuned = True
    return True


def cpu_threads_tuned() -> bool:
    """Whether ``tune_cpu_threads`` ran: the BLAS is single-threaded and minillm splits the work."""
    return _cpu_threads_tuned


_cpu_threads_tuned = False


@functools.lru_cache(maxsize=None)
def numpy_openblas():
    """(library, symbol prefix, symbol suffix) of the OpenBLAS that NumPy loaded, or None.

    NumPy's wheels bundle OpenBLAS with prefixed symbols (``scipy_openblas_*64_``,
    the CBLAS ones ``scipy_cblas_*64_``; ``64_``: 64-bit integers); other builds use
    the plain names. Found among the libraries this process has mapped (Linux);
    anywhere else, or with another BLAS, None. ``kernels/matmul.py`` calls its CBLAS.
    """
    try:
        import ctypes  # noqa: PLC0415

        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
                if (hasattr(lib, f"{prefix}_get_num_threads{suffix}")
                        and hasattr(lib, f"{prefix}_set_num_threads{suffix}")):
                    return lib, prefix, suffix
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def _openblas_thread_functions():
    """(get, set) for the thread count of the OpenBLAS that NumPy loaded, or None."""
    found = numpy_openblas()
    if found is None:
        return None
    lib, prefix, suffix = found
    return getattr(lib, f"{prefix}_get_num_threads{suffix}"), getattr(lib, f"{prefix}_set_num_threads{suffix}")


def can_limit_blas_threads() -> bool:
    return _openblas_thread_functions() is not None


@contextlib.contextmanager
def blas_threads(n: int):
    """Within this block NumPy's BLAS uses ``n`` threads (when it is an OpenBLAS we can reach).

    For many small matrix products, running them in our own threads, each with a
    single-threaded BLAS, beats one multi-threaded BLAS splitting every small
    product (CPU attention: ~35% faster on 2 cores). The count is restored after.
    """
    functions = _openblas_thread_functions()
    if functions is None:
        yield False
        return
    get, set_ = functions
    previous = get()
    set_(n)
    try:
        yield True
    finally:
        set_(previous)


# ------------------------------------------------------------------ dtypes


def get_default_dtype() -> np.dtype:
    return _default_dtype


def set_default_dtype(dtype) -> None:
    """Default dtype for floating tensors made from Python numbers and lists (float32 unless set)."""
    global _default_dtype
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"default dtype must be floating point, got {dtype}")
    _default_dtype = dtype


# ------------------------------------------------------------------ random numbers
#
# One seed drives every device. The CPU stream is a NumPy PCG64 Generator; each
# GPU gets a CuPy generator whose seed is derived from (seed, device). Parameter
# initialisation draws on the CPU stream and copies to the device, so the same
# seed gives the same model on every device.

_seed = 0
_cpu_rng = np.random.Generator(np.random.PCG64(0))
_cuda_rngs: dict[str, Any] = {}
_cuda_draws: dict[str, int] = {}


def _derive_seed(*parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def manual_seed(seed: int) -> None:
    """Seed every random stream (CPU and all GPUs) from one integer."""
    global _seed, _cpu_rng
    _seed = int(seed)
    _cpu_rng = np.random.Generator(np.random.PCG64(_seed))
    _cuda_rngs.clear()
    _cuda_draws.clear()


def cpu_generator() -> np.random.Generator:
    return _cpu_rng


def _cuda_rng(device: str):
    device = parse_device(device)
    rng = _cuda_rngs.get(device)
    if rng is None:
        with device_context(device):
            rng = _cupy.random.RandomState(_derive_seed(_seed, device, _cuda_draws.get(device, 0)))
        _cuda_rngs[device] = rng
    _cuda_draws[device] = _cuda_draws.get(device, 0) + 1
    return rng


def random_uniform(shape, device: str = "cpu", dtype=None):
    """Uniform [0, 1) samples on a device (the one RNG API both backends share)."""
    dtype = np.dtype(dtype or _default_dtype)
    if device == "cpu":
        return _cpu_rng.random(shape, dtype=dtype if dtype.kind == "f" and dtype.itemsize >= 4 else np.float32)
    with device_context(device):
        return _cuda_rng(device).random_sample(shape, dtype=dtype)


def random_normal(shape, device: str = "cpu", dtype=None, std: float = 1.0):
    """Normal(0, std^2) samples on a device."""
    dtype = np.dtype(dtype or _default_dtype)
    if device == "cpu":
        out = _cpu_rng.standard_normal(shape, dtype=dtype)
    else:
        with device_context(device):
            out = _cuda_rng(device).standard_normal(shape, dtype=dtype)
    if std != 1.0:
        out *= std
    return out


def get_rng_state() -> dict:
    """A JSON-serialisable snapshot of the random streams (for checkpoints)."""
    return {"seed": _seed, "cpu": _cpu_rng.bit_generator.state, "cuda_draws": dict(_cuda_draws)}


def set_rng_state(state: dict) -> None:
    """Restore ``get_rng_state()``. GPU streams restart from a seed derived from
    (seed, device, number of draws so far), so a resumed run is deterministic."""
    global _seed
    _seed = int(state["seed"])
    _cpu_rng.bit_generator.state = state["cpu"]
    _cuda_rngs.clear()
    _cuda_draws.clear()
    _cuda_draws.update({k: int(v) for k, v in state.get("cuda_draws", {}).items()})
