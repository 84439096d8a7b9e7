"""minillm: a GPT built from scratch on arrays, with hand-written backprop.

    import numpy as np, minillm as mm
    from minillm import functional as F
    x = mm.Tensor(np.random.randn(4, 8), requires_grad=True)
    F.gelu(x).sum().backward(); x.grad
"""

from . import backend
from .backend import get_default_dtype, manual_seed, set_default_dtype
from .tensor import Function, Tensor, is_grad_enabled, no_grad
from . import functional
from .functional import concat, maximum, minimum, split, stack, where
from .gradcheck import GradcheckError, gradcheck
from .graph import draw_graph
from .precision import autocast, get_float32_matmul_precision, set_float32_matmul_precision

__version__ = "0.1.0"

__all__ = [
    "Tensor", "Function", "no_grad", "is_grad_enabled", "manual_seed", "get_default_dtype",
    "set_default_dtype", "functional", "concat", "stack", "split", "where", "maximum", "minimum",
    "gradcheck", "GradcheckError", "draw_graph", "backend",
    "autocast", "set_float32_matmul_precision", "get_float32_matmul_precision",
]
