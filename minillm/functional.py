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
from .ops.activation import (  # noqa: F401
    gelu, gelu_composed, log_softmax, log_softmax_composed, relu, sigmoid, silu, softmax,
    softmax_composed,
)
from .ops.loss import cross_entropy, cross_entropy_composed  # noqa: F401
from .ops.norm import layer_norm, layer_norm_composed, rms_norm, rms_norm_composed  # noqa: F401
from .ops.attention import (  # noqa: F401
    scaled_dot_product_attention, scaled_dot_product_attention_composed,
)
from .ops.embedding import dropout, embedding  # noqa: F401
from .ops.rope import rope, rope_composed  # noqa: F401
from .ops.swiglu import swiglu, swiglu_composed  # noqa: F401
