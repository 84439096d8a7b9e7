"""The public op namespace, ``from minillm import functional as F``.

Every op of ``minillm/ops`` is re-exported here under its PyTorch-like name.
Fused hot-path ops (layer_norm, cross_entropy, gelu, softmax, attention) sit
beside their ``*_composed`` versions, which build the same function from
primitive ops for teaching and are tested equal to the fused ones.
"""

from .ops.elementwise import (  # noqa: F401
    abs, add, clip, div, exp, log, maximum, minimum, mul, neg, pow, sqrt, sub, tanh, where,
)
from .ops.reduce import max, mean, sum, var  # noqa: F401
from .ops.shape import (  # noqa: F401
    concat, expand, getitem, permute, reshape, split, squeeze, stack, transpose, unsqueeze,
)
from .ops.matmul import linear, matmul  # noqa: F401
import importlib as _importlib  # TEMPORARY while the families are being written (lead removes)
for _mod, _names in [
    ("activation", "gelu gelu_composed log_softmax log_softmax_composed relu sigmoid silu softmax softmax_composed"),
    ("loss", "cross_entropy cross_entropy_composed"),
    ("norm", "layer_norm layer_norm_composed rms_norm rms_norm_composed"),
    ("attention", "scaled_dot_product_attention scaled_dot_product_attention_composed"),
    ("embedding", "dropout embedding"),
]:
    try:
        _m = _importlib.import_module("minillm.ops." + _mod)
        for _n in _names.split():
            if hasattr(_m, _n):
                globals()[_n] = getattr(_m, _n)
    except ImportError:
        pass
