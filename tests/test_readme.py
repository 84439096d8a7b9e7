"""README.md's "A taste" block runs as printed, and does what its comments say."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_taste_block_runs():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## A taste\s+```python\n(.*?)```", text, re.S).group(1)
    first, rest = block.split("y.backward()", 1)                        # run it in two parts, checking between
    rest = "y.backward()" + rest
    namespace = {}
    exec(compile(first, "README.md (A taste)", "exec"), namespace)     # noqa: S102 (our own README)
    exec(compile(rest.split("\n", 1)[0], "README.md (A taste)", "exec"), namespace)   # noqa: S102
    mm, F, x, w = (namespace[name] for name in ("mm", "F", "x", "w"))
    assert x.data.dtype == np.float64                                  # "float64 data stays float64"
    assert isinstance(x.grad, np.ndarray) and isinstance(w.grad, np.ndarray)   # "x.grad, w.grad are NumPy arrays"
    exec(compile(rest.split("\n", 1)[1], "README.md (A taste)", "exec"), namespace)   # noqa: S102
    assert mm.gradcheck(lambda x, w: F.gelu(F.linear(x, w)), x, w) is True       # "True"
    ids = namespace["ids"]                                             # 3 prompt tokens + 20 new ones
    assert ids.shape == (1, 23) and ids.dtype == np.int64 and ids[0, :3].tolist() == [1, 2, 3]


def _section(title: str) -> str:
    return README.read_text(encoding="utf-8").split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_what_is_where_names_paths_that_exist():
    """README's "What is where" table: every path in its first column is in the repository."""
    root = README.parent
    rows = [row for row in _section("What is where").splitlines() if row.startswith("| `")]
    paths = [path for row in rows for path in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert len(paths) >= 20
    assert [path for path in paths if not (root / path).exists()] == []


def test_every_example_and_doc_is_listed_has_a_main_and_is_smoke_tested():
    """README's "Examples and docs": the examples named are exactly those in examples/, each is a
    `main()` "and is smoke-tested" (loaded by a test in tests/examples), and every doc named exists."""
    root = README.parent
    section = _section("Examples and docs")
    on_disk = {p.name for p in (root / "examples").glob("[0-9][0-9]_*.py")}
    assert set(re.findall(r"\b\d\d_\w+\.py\b", section)) == on_disk
    tests = "".join(p.read_text(encoding="utf-8") for p in (root / "tests" / "examples").glob("test_*.py"))
    for name in sorted(on_disk):
        assert "\ndef main(" in (root / "examples" / name).read_text(encoding="utf-8"), name
        assert f'load("{name[:-3]}")' in tests, f"{name} has no smoke test"
    docs = set(re.findall(r"docs/(\w+\.md)", section))
    assert docs == {p.name for p in (root / "docs").glob("*.md")}


def test_runtime_dependencies_are_numpy_regex_and_tqdm():
    """README: "Runtime dependencies: `numpy`, `regex`, `tqdm` (and `cupy` for a GPU)": they are
    pyproject's dependencies, and every module of minillm imports with nothing else available
    (matplotlib, CuPy and ml_dtypes are imported only where they are used)."""
    import subprocess
    import sys
    import tomllib

    root = README.parent
    assert "Runtime dependencies: `numpy`, `regex`, `tqdm` (and `cupy` for a GPU)" in README.read_text(encoding="utf-8")
    declared = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert sorted(re.match(r"[A-Za-z0-9_-]+", d).group() for d in declared) == ["numpy", "regex", "tqdm"]
    script = """
import importlib, pkgutil, sys
from importlib.metadata import packages_distributions
ALLOWED = {"numpy", "regex", "tqdm", "minillm"}
BLOCKED = {top for top, dists in packages_distributions().items() if not {d.lower() for d in dists} & ALLOWED}
BLOCKED |= {"cupy", "cupyx", "ml_dtypes", "matplotlib"}        # whether installed or not
class Block:                                                # every other installed package is absent
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
import minillm
names = [m.name for m in pkgutil.walk_packages(minillm.__path__, "minillm.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) >= 80
