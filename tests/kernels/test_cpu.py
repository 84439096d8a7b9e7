"""minillm/kernels/cpu.py: compiled CPU loops, their cache, and the fall-back to NumPy passes."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import minillm as mm
from minillm import functional as F
from minillm.kernels import cpu
from minillm.ops import common

needs_compiler = pytest.mark.skipif(cpu.compiler() is None, reason="no C++ compiler (or not Linux) here")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own, and the in-process library cache emptied before and after."""
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path))
    cpu.library.cache_clear()
    yield tmp_path / "kernels"
    cpu.library.cache_clear()


AXPY = ("T x, T a", "T y", "y += a * x;")


@needs_compiler
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7, 3), (1 << 19,)])
def test_elementwise_kernel_equals_the_numpy_formula(dtype, shape):
    """An in-out output (y += a x), a number input, any shape; above PARALLEL_MIN_ELEMENTS the
    loop runs in one piece per thread, each piece starting at its own offset."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    y = rng.standard_normal(shape).astype(dtype)
    expected = y.astype(np.float64) + 2.5 * x.astype(np.float64)
    cpu.ElementwiseKernel(*AXPY, "test_axpy")(x, 2.5, y)
    np.testing.assert_allclose(y, expected, **({'rtol': 1e-6} if dtype == np.float32 else {'rtol': 1e-15, 'atol': 1e-15}))
    assert y.dtype == dtype


@needs_compiler
def test_elementwise_kernel_pieces_cover_every_element(monkeypatch):
    """Three threads over a length that does not divide: every element exactly once."""
    monkeypatch.setattr(common, "CPU_THREADS", 3)
    n = common.PARALLEL_MIN_ELEMENTS + 7
    count = np.zeros(n, dtype=np.float64)
    cpu.ElementwiseKernel("T one", "T c", "c += one;", "test_count")(1.0, count)
    assert (count == 1.0).all()


@needs_compiler
def test_elementwise_kernel_rejects_bad_arguments():
    kernel = cpu.ElementwiseKernel(*AXPY, "test_axpy")
    x32, y32 = np.ones(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(TypeError, match="2 inputs and 1 outputs"):
        kernel(x32, y32)
    with pytest.raises(ValueError, match="one shape"):
        kernel(np.ones(5, np.float32), 1.0, y32)
    with pytest.raises(ValueError, match="one dtype"):
        kernel(np.ones(4, np.float64), 1.0, y32)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel(np.ones(8, np.float32)[::2], 1.0, y32)
    with pytest.raises(ValueError, match="float32 or float64"):
        kernel(np.ones(4, np.int64), 1.0, np.ones(4, np.int64))
    with pytest.raises(ValueError, match="overlaps"):
        kernel(y32, 1.0, y32)
    with pytest.raises(ValueError, match="cannot read parameter"):
        cpu.ElementwiseKernel("T x, int*", "T y", "y = x;", "test_bad")


def test_loading_a_kernel_keeps_denormals():
    """A library linked with -ffast-math would switch flush-to-zero on for the whole process
    (crtfastmath.o): NumPy's float32 denormals would become 0. The link step has no such flag."""
    if cpu.compiler() is None:
        pytest.skip("no C++ compiler here")
    code = ("import numpy as np; from minillm.kernels import cpu; "
            "cpu.ElementwiseKernel('T x', 'T y', 'y = x;', 'test_copy')(np.ones(3, np.float32), np.empty(3, np.float32)); "
            "tiny = np.finfo(np.float32).smallest_subnormal; print(float(tiny * np.float32(3)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert float(out.stdout) > 0.0


@needs_compiler
def test_library_is_built_once_and_then_read_from_the_cache(fresh_cache, monkeypatch):
    source = 'extern "C" int test_seven() { return 7; }\n'
    assert cpu.library("test_seven", source).test_seven() == 7
    built = list(fresh_cache.glob("test_seven-*.so"))
    assert len(built) == 1 and not list(fresh_cache.glob(".*"))        # no partial file left behind
    cpu.library.cache_clear()

    def no_compiling(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu, "_compile", no_compiling)
    assert cpu.library("test_seven", source).test_seven() == 7


@needs_compiler
def test_a_compile_error_warns_once_and_ops_fall_back(fresh_cache, monkeypatch):
    monkeypatch.setattr(cpu, "_failed", set())
    with pytest.warns(RuntimeWarning, match="could not build the CPU kernel 'test_broken'"):
        assert cpu.library("test_broken", "this is not C++") is None
    kernel = cpu.ElementwiseKernel("T x", "T y", "y = x +;", "test_broken_loop")
    x = np.ones(3, np.float32)
    with pytest.warns(RuntimeWarning):
        assert not kernel.available(x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # a second time: no warning
        assert not kernel.available(x, x)
    with pytest.raises(RuntimeError, match="could not be compiled"):
        kernel(x, np.empty_like(x))


@needs_compiler
def test_an_unwritable_cache_builds_in_a_folder_of_its_own(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(blocked))
    cpu.library.cache_clear()
    try:
        assert cpu.library("test_eight", 'extern "C" int test_eight() { return 8; }\n').test_eight() == 8
    finally:
        cpu.library.cache_clear()


def test_switches_turn_the_kernels_off(monkeypatch):
    x = np.ones(4, np.float32)
    with cpu.use_cpu_kernels(False):
        assert not cpu.enabled() and not cpu.fusable(x)
        with cpu.use_cpu_kernels(True):
            assert cpu.enabled() == (cpu.compiler() is not None)
        assert not cpu.enabled()
    monkeypatch.setenv("MINILLM_CPU_KERNELS", "0")
    assert not cpu.enabled()
    monkeypatch.setenv("MINILLM_CPU_KERNELS", "1")
    assert cpu.enabled() == (cpu.compiler() is not None)


def test_fusable_takes_contiguous_float_numpy_arrays_of_one_dtype():
    if not cpu.enabled():
        pytest.skip("CPU kernels are off here")
    a32, a64 = np.ones((2, 3), np.float32), np.ones((2, 3), np.float64)
    assert cpu.fusable(a32, a32) and cpu.fusable(a64)
    assert not cpu.fusable(a32, a64)
    assert not cpu.fusable(a32.T)
    assert not cpu.fusable(np.ones(3, np.int32))
    assert not cpu.fusable(np.ones(3, np.float16))
    assert not cpu.fusable()


def test_no_compiler_runs_the_numpy_passes_with_the_same_results(monkeypatch):
    """Where no compiler is found (Windows, macOS, a bare container) the ops run their NumPy
    passes; an op's backward follows what its forward did."""
    x = np.random.default_rng(1).standard_normal((5, 300)).astype(np.float32)
    results = []
    for compiler in ("found", None):
        if compiler is None:
            monkeypatch.setattr(cpu, "compiler", lambda: None)
        assert cpu.enabled() == (compiler is not None and cpu.compiler() is not None)
        xt = mm.Tensor(x, requires_grad=True)
        y = F.gelu(xt)
        y.backward(np.cos(x))
        results.append((y.data, xt.grad))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)


@needs_compiler
def test_the_choice_is_saved_with_the_forward():
    """Kernels switched off between forward and backward: the backward still matches its forward."""
    x = np.random.default_rng(2).standard_normal((4, 9))
    reference = mm.Tensor(x, requires_grad=True)
    F.gelu(reference).sum().backward()
    for first in (True, False):
        xt = mm.Tensor(x, requires_grad=True)
        with cpu.use_cpu_kernels(first):
            y = F.gelu(xt).sum()
        with cpu.use_cpu_kernels(not first):
            y.backward()
        np.testing.assert_allclose(xt.grad, reference.grad, rtol=1e-12)


@pytest.fixture
def fresh_compiler():
    cpu.compiler.cache_clear()
    yield
    cpu.compiler.cache_clear()


def _fake_compiler(folder, name, version_line):
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernels are built on Linux only")
def test_only_gcc_on_glibc_builds_the_kernels(tmp_path, monkeypatch, fresh_compiler):
    """clang would call the scalar tanh/exp in the loops (slower than NumPy): passed over, as is a
    libc without glibc's vector math; a GCC named by $CXX is taken."""
    import platform

    monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path, "clang++", "clang version 17.0.6")))
    assert cpu.compiler() is None and not cpu.enabled()
    cpu.compiler.cache_clear()
    gcc = _fake_compiler(tmp_path, "my-g++", "my-g++ (GCC) 13.2.0")
    monkeypatch.setenv("CXX", str(gcc))
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert cpu.compiler() == str(gcc)
    cpu.compiler.cache_clear()
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")          # not measured there
    assert cpu.compiler() is None
    cpu.compiler.cache_clear()
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))          # musl (Alpine)
    assert cpu.compiler() is None


@needs_compiler
def test_a_damaged_cached_library_is_built_again(fresh_cache):
    """A cached file that does not load (damaged on disk between two runs) is built anew."""
    source = 'extern "C" int test_nine() { return 9; }\n'
    code = f"from minillm.kernels import cpu; cpu.library('test_nine', {source!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ},
                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    (built,) = fresh_cache.glob("test_nine-*.so")                   # built by another process
    built.write_bytes(b"not a shared object")                       # a disk error, a killed copy
    assert cpu.library("test_nine", source).test_nine() == 9
    assert built.read_bytes()[:4] == b"\x7fELF"
