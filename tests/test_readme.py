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
