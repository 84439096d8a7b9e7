"""Shared test setup: the --device option and data-folder helpers.

``pytest`` runs everything on the CPU; ``pytest --device cuda`` runs the same
device-aware tests on CuPy (and skips them with a reason when no GPU is there).
"""

from pathlib import Path

import pytest

from hypothesis import HealthCheck, settings

import minillm as mm

# the autouse seeding fixture is function-scoped; it is harmless under @given
settings.register_profile("minillm", suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
settings.load_profile("minillm")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="device for device-aware tests (default cpu)")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name == "cuda" and not mm.backend.cuda_available():
        pytest.skip("--device cuda given but no GPU/CuPy is available")
    return name


@pytest.fixture
def gpu(device):
    """The device for a test of GPU-only code (CUDA kernels, graphs, reduced precision): skipped
    on the CPU, run with ``pytest --device cuda``."""
    if device == "cpu":
        pytest.skip("a GPU-only test: run with --device cuda")
    return device


@pytest.fixture
def restore_precision():
    """Leave the float32 matmul precision as the test found it (tests that switch TF32 on)."""
    yield
    mm.set_float32_matmul_precision("highest")


@pytest.fixture(params=["compiled", "numpy"])
def cpu_path(request):
    """Run a test twice: with the compiled CPU kernels (minillm/kernels/cpu.py; skipped where no
    C++ compiler is at hand) and with the NumPy passes that run without them."""
    from minillm.kernels import cpu  # noqa: PLC0415

    if request.param == "compiled" and not cpu.enabled():
        pytest.skip("no C++ compiler here for the CPU kernels")
    with cpu.use_cpu_kernels(request.param == "compiled"):
        yield request.param


@pytest.fixture(autouse=True)
def _seeded():
    mm.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA
