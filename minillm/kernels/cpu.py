"""Fused loops for the CPU: C++ compiled on first use by the machine's compiler, called by ctypes.

NumPy makes one pass over memory per ufunc: GPT-2's GELU is eight passes
forward, AdamW a dozen, layer norm six forward and ten backward, each pass
reading and writing whole arrays. On a GPU the same chains are one CUDA kernel
each (the other modules of this package). This module gives the CPU the same:
a kernel's arithmetic, written once as the body of an elementwise loop (the
very body its CUDA ``ElementwiseKernel`` runs, where one exists) or as a C++
row loop, compiled with ``-O3 -march=native`` into a shared library, loaded
with ``ctypes`` (which lets go of the GIL during the call, so minillm's CPU
threads run the pieces of one array side by side: ``run_parallel``).

Measured on the project's 2-vCPU Xeon, one thread, (2048, 1536) float32: GELU
forward 5.8 -> 2.7 ms, backward 6.6 -> 2.8 ms against the NumPy passes
(docs/performance.md has the step's figures).

When it is used: on x86-64 Linux with glibc, whose vector math library (libmvec) GCC
calls to vectorize ``tanh``/``exp``/``erfc`` in these loops, with GCC's C++
compiler (``$CXX``, else ``c++`` or ``g++`` on the PATH; clang is passed over:
without a flag per target its loops call the scalar functions, slower than
NumPy), unless ``MINILLM_CPU_KERNELS=0`` is set or ``use_cpu_kernels(False)``
is in force.
Otherwise, or if a compilation fails (one warning says why), every op runs its
NumPy passes, which the tests hold equal to the kernels. The choice is made in
an op's forward and saved with it, so its backward always matches.

Compiled libraries are cached in ``$MINILLM_CACHE_DIR`` (default
``$XDG_CACHE_HOME/minillm/kernels`` or ``~/.cache/minillm/kernels``), named by a
hash of the source, the flags, the compiler's version and the CPU's feature
flags (``-march=native`` code must not run on another CPU), and written
atomically, so processes that compile at once do not read half a file.

The flags are ``-O3 -march=native -ffast-math -fno-finite-math-only``: fast
math lets the compiler reorder sums (a row's sum may differ from NumPy's in the
last bits) and call the vector math library; ``-fno-finite-math-only`` keeps
infinities and NaNs meaning what they mean (an overflowing loss stays inf).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import numpy as np

FLAGS = ("-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-std=c++17", "-fPIC")
# Linked in a second step, without the fast-math flags: with them the compiler adds crtfastmath.o to
# the library, whose loading turns on flush-to-zero for denormals in the whole process (NumPy's too).
LINK_FLAGS = ("-shared",)
_DTYPES = {np.dtype(np.float32): ("float", "f32"), np.dtype(np.float64): ("double", "f64")}
# glibc declares the vector versions of tanh, exp, erfc, ... (libmvec) only under __FAST_MATH__, which
# -fno-finite-math-only leaves undefined: defined here, so the loops still call them. Every C++ source
# given to ``library`` starts with it (ElementwiseKernel adds it itself).
HEADER = "#ifndef __FAST_MATH__\n#define __FAST_MATH__ 1\n#endif\n#include <math.h>\n#include <stddef.h>\n"

_override: list[bool] = []          # use_cpu_kernels(...) in force, innermost last
_override_lock = threading.Lock()


@contextlib.contextmanager
def use_cpu_kernels(enabled: bool):
    """Within the block, ops use the compiled CPU kernels (when they can be built) or, with
    ``False``, their NumPy passes. For tests and comparisons; ``MINILLM_CPU_KERNELS=0`` in the
    environment turns them off for a whole run."""
    with _override_lock:
        _override.append(bool(enabled))
    try:
        yield
    finally:
        with _override_lock:
            _override.pop()


def _wanted() -> bool:
    if _override:
        return _override[-1]
    return os.environ.get("MINILLM_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def compiler() -> str | None:
    """The C++ compiler to build kernels with: GCC's (``$CXX``, else ``c++`` or ``g++`` on the PATH)
    on x86-64 Linux with glibc (where the loops were measured vectorised); None elsewhere or when
    there is none."""
    if (not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "amd64")
            or platform.libc_ver()[0] != "glibc"):
        return None
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++"]
    for name in candidates:
        path = shutil.which(name)
        if path and _is_gcc(path):
            return path
    return None


def _is_gcc(path: str) -> bool:
    """GCC calls glibc's vector math (libmvec) from vectorised loops by itself; clang needs a flag
    per target, and without it every tanh/exp of a loop is a scalar call, several times slower
    than NumPy's own vectorised ufuncs. So only GCC builds the kernels (clang: the NumPy passes)."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "clang" not in done.stdout.lower() and (
        "free software foundation" in done.stdout.lower() or "gcc" in done.stdout.lower()
        or "g++" in done.stdout.lower())


def enabled() -> bool:
    """True when ops should use the compiled CPU kernels (they may still fail to build)."""
    return _wanted() and compiler() is not None


def fusable(*arrays) -> bool:
    """True when the compiled CPU kernels take these arrays: NumPy, C-contiguous, all float32 or
    all float64, and kernels are on (``enabled``)."""
    return enabled() and _takes(*arrays)


def _takes(*arrays) -> bool:
    """The arrays a compiled loop reads: NumPy, C-contiguous, all float32 or all float64."""
    dtype = getattr(arrays[0], "dtype", None) if arrays else None
    return dtype in _DTYPES and all(
        type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous for a in arrays)


def cache_dir() -> str:
    base = os.environ.get("MINILLM_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "minillm")
    return os.path.join(base, "kernels")


@functools.lru_cache(maxsize=None)
def _machine_key() -> str:
    """The compiler's version and the CPU's feature flags: what ``-march=native`` code depends on."""
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    return version + flags


_failed: set[str] = set()


@functools.lru_cache(maxsize=None)
def library(name: str, source: str):
    """The shared library built from C++ ``source`` (compiled once per machine, then cached), or
    None when it cannot be built: no compiler, or a compilation error (warned about once). A
    cached file that does not load (damaged on disk) is built again."""
    cxx = compiler()
    if cxx is None:
        return None
    digest = hashlib.sha256("\0".join((source, " ".join(FLAGS + LINK_FLAGS), _machine_key())).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir(), f"{name}-{digest}.so")
    for attempt in ("cached", "rebuilt"):
        try:
            if attempt == "rebuilt" or not os.path.exists(path):
                path = _compile(cxx, source, path)
            return ctypes.CDLL(path)
        except (OSError, subprocess.SubprocessError) as error:
            if attempt == "cached" and os.path.exists(path) and not isinstance(error, subprocess.SubprocessError):
                continue                                     # a damaged cached file: build it anew
            if name not in _failed:
                _failed.add(name)
                warnings.warn(f"minillm: could not build the CPU kernel {name!r} ({error}); "
                              "using NumPy passes instead", RuntimeWarning, stacklevel=3)
            return None
    return None


def _compile(cxx: str, source: str, path: str) -> str:
    """Build ``source`` into the library ``path`` (or, if its folder cannot be written, into a new
    temporary folder); returns the path written."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, suffix=".probe")
        probe.close()
    except OSError:                                      # an unwritable cache: this process's own folder
        folder = tempfile.mkdtemp(prefix="minillm-kernels-")
        path = os.path.join(folder, os.path.basename(path))
    with tempfile.TemporaryDirectory(prefix="minillm-build-") as build:
        source_path = os.path.join(build, "kernel.cpp")
        with open(source_path, "w") as file:
            file.write(source)
        partial = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}")
        object_path = os.path.join(build, "kernel.o")
        for command in ([cxx, *FLAGS, "-c", source_path, "-o", object_path],
                        [cxx, *LINK_FLAGS, object_path, "-o", partial, "-lm"]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                with contextlib.suppress(OSError):
                    os.remove(partial)
                raise subprocess.SubprocessError(f"{os.path.basename(cxx)} exited with {done.returncode}: "
                                                 f"{done.stderr.strip()[-2000:]}")
        os.replace(partial, path)                        # atomic: another process sees all or nothing
    return path


# ------------------------------------------------------------ elementwise kernels


_PARAM = re.compile(r"^\s*(?:T|float|double)\s+([A-Za-z_]\w*)\s*$")


def _names(params: str) -> list[str]:
    names = []
    for part in filter(None, (p.strip() for p in params.split(","))):
        match = _PARAM.match(part)
        if not match:
            raise ValueError(f"ElementwiseKernel: cannot read parameter {part!r} (expected 'T name')")
        names.append(match.group(1))
    return names


class ElementwiseKernel:
    """An elementwise loop on NumPy arrays from the same three strings as ``cupy.ElementwiseKernel``.

    ``in_params`` / ``out_params`` list ``T name`` entries, ``body`` is C++ for
    one element, reading the inputs and assigning the outputs by name (an output
    may be read too: it is a reference to the array's element, updated in place).
    At a call each input is an array or a Python number; the arrays (inputs and
    outputs) are C-contiguous, of one shape and of one dtype, float32 or
    float64, which is ``T``. The loop runs in ``run_parallel`` pieces, one per
    CPU thread, for large arrays. For example::

        axpy = ElementwiseKernel("T x, T a", "T y", "y += a * x;", "axpy")
        axpy(x, 2.0, y)          # y <- y + 2 x, one pass, NumPy arrays

    One library is compiled per kernel and per pattern of array/number inputs.
    """

    def __init__(self, in_params: str, out_params: str, body: str, name: str, preamble: str = ""):
        self.inputs, self.outputs = _names(in_params), _names(out_params)
        self.body, self.name, self.preamble = body, name, preamble
        self._functions: dict = {}           # (input pattern, dtype) -> compiled entry (or None)

    def source(self, scalars: tuple[bool, ...]) -> str:
        """The C++ for inputs where ``scalars[i]`` says input i is a number: one template loop
        and an ``extern "C"`` entry per dtype, ``name_f32(n, pointers, numbers)``."""
        lines = [HEADER, self.preamble, "template <typename T>",
                 "static void loop(long n, void* const* arrays, const double* numbers) {"]
        arrays = numbers = 0
        for name, scalar in zip(self.inputs, scalars):
            if scalar:
                lines.append(f"    const T {name} = T(numbers[{numbers}]);")
                numbers += 1
            else:
                lines.append(f"    const T* __restrict {name}_ = (const T*) arrays[{arrays}];")
                arrays += 1
        for name in self.outputs:
            lines.append(f"    T* __restrict {name}_ = (T*) arrays[{arrays}];")
            arrays += 1
        lines.append("    for (long i = 0; i < n; i++) {")
        lines += [f"        const T {name} = {name}_[i];" for name, s in zip(self.inputs, scalars) if not s]
        lines += [f"        T& {name} = {name}_[i];" for name in self.outputs]
        lines += ["        " + line for line in self.body.strip().splitlines()]
        lines += ["    }", "}"]
        for c_type, suffix in _DTYPES.values():
            lines.append(f'extern "C" void {self.name}_{suffix}(long n, void* const* arrays, const double* numbers)'
                         f" {{ loop<{c_type}>(n, arrays, numbers); }}")
        return "\n".join(lines) + "\n"

    def function(self, scalars: tuple[bool, ...], dtype):
        """The compiled entry for this input pattern and dtype, or None when it cannot be built."""
        key = (scalars, np.dtype(dtype))
        if key not in self._functions:
            lib = library(self.name, self.source(scalars))
            entry = None
            if lib is not None:
                entry = getattr(lib, f"{self.name}_{_DTYPES[key[1]][1]}")
                entry.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
                entry.restype = None
            self._functions[key] = entry
        return self._functions[key]

    def available(self, *args) -> bool:
        """True when a call with these arguments would run compiled (it builds the library)."""
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        if not fusable(*arrays):
            return False
        scalars = tuple(not isinstance(a, np.ndarray) for a in args[: len(self.inputs)])
        return self.function(scalars, arrays[0].dtype) is not None

    def __call__(self, *args) -> None:
        if len(args) != len(self.inputs) + len(self.outputs):
            raise TypeError(f"{self.name}: {len(self.inputs)} inputs and {len(self.outputs)} outputs expected, "
                            f"got {len(args)} arguments")
        ins, outs = args[: len(self.inputs)], args[len(self.inputs):]
        scalars = tuple(not isinstance(a, np.ndarray) for a in ins)
        arrays = [a for a in ins if isinstance(a, np.ndarray)] + list(outs)
        if not _takes(*arrays) or any(a.shape != arrays[0].shape for a in arrays):   # (switched off or not:
            # a backward whose forward ran compiled runs compiled too)
            raise ValueError(f"{self.name}: the arrays must be C-contiguous NumPy arrays of one shape and "
                             f"one dtype (float32 or float64)")
        for i, out in enumerate(outs):
            for other in arrays[: len(arrays) - len(outs) + i]:
                if np.may_share_memory(other, out):
                    raise ValueError(f"{self.name}: output {self.outputs[i]!r} overlaps another argument")
        entry = self.function(scalars, arrays[0].dtype)
        if entry is None:
            raise RuntimeError(f"{self.name}: the CPU kernel could not be compiled")
        numbers = (ctypes.c_double * max(1, sum(scalars)))(*[float(a) for a, s in zip(ins, scalars) if s])
        bases = [a.ctypes.data for a in arrays]
        size, itemsize = arrays[0].size, arrays[0].itemsize

        def piece(part: slice) -> None:
            pointers = (ctypes.c_void_p * len(bases))(*[base + part.start * itemsize for base in bases])
            entry(part.stop - part.start, pointers, numbers)

        from ..ops.common import row_ranges, run_parallel  # noqa: PLC0415 (ops imports kernels)

        if size:
            run_parallel(piece, row_ranges(size, 1))
