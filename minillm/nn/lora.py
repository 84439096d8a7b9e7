"""LoRA: train a low-rank change to a frozen Linear instead of the Linear itself.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021). A
Linear computes ``y = x Wᵀ + b`` with W of shape (out, in). LoRA keeps W
frozen and learns ΔW = (α / r) · B A, a matrix of rank at most r:

    y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ
        A (r, in)   drawn at random (a down-projection to r dimensions)
        B (out, r)  zeros, so ΔW = 0 and training starts exactly at the base model

Only A and B train: r · (in + out) numbers per adapted layer instead of
in · out (for gpt2-124m's c_attn, 768 → 2304, at r = 16: 49,152 instead of
1,769,472). The scale α / r keeps the size of the update roughly independent
of r, so a learning rate tuned at one rank carries over to another.

The gradients need nothing new: the adapter branch is two ``F.linear`` calls,
and the frozen W simply gets no gradient (``requires_grad`` False).

    dL/dB = (α/r) · gᵀ (x Aᵀ)        g = dL/dy (N, out),  x (N, in)
    dL/dA = (α/r) · (g B)ᵀ x

(with B = 0 at the start, dL/dA is 0 on the first step: A only starts moving once
B has; B moves at once since x Aᵀ is non-zero).

After training the update can be folded into W (``merge``): one matrix again,
inference at the base model's cost. ``unmerge`` takes it back out.

    model = GPT(cfg); apply_lora(model, rank=16, alpha=16)      # every Linear in the blocks
    lora_parameter_count(model)                                  # Σ r (in + out)
    save_adapters(model, "adapters.safetensors")                 # the trainable arrays only
    load_adapters(other_model_with_same_lora, "adapters.safetensors")
"""

from __future__ import annotations

import fnmatch
import json
import math
import os

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor
from .layers import Dropout, Linear, normal_parameter
from .module import Module
from .parameter import Parameter
from ..checks import is_integer

# every Linear inside the transformer blocks (attention and MLP projections)
DEFAULT_TARGETS = ("h.*",)


class LoRALinear(Module):
    """A frozen ``Linear`` plus a trainable low-rank update ``(alpha / rank) · B A``.

    It takes over the wrapped layer's ``weight`` and ``bias`` Parameters (the
    same objects, frozen), so its state-dict keys are the Linear's plus
    ``lora_A`` and ``lora_B``: a base checkpoint loads into it unchanged.
    """

    def __init__(self, linear: Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(linear, Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(linear).__name__}")
        if not is_integer(rank) or rank < 1:
            raise ValueError(f"LoRA: rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA: alpha must be positive, got {alpha!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False
        device, dtype = linear.weight.device, linear.weight.dtype
        # A ~ N(0, 1/in): x Aᵀ has about the scale of x (the "random" factor); B = 0
        self.lora_A = normal_parameter((self.rank, self.in_features), 1.0 / math.sqrt(self.in_features),
                                       device, dtype)
        self.lora_B = Parameter(np.zeros((self.out_features, self.rank), dtype=dtype), device=device)
        self.lora_dropout = Dropout(dropout)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)                       # (…, out): the frozen base
        if self.merged:
            return y                                                  # ΔW is already inside weight
        down = F.linear(self.lora_dropout(x), self.lora_A)            # (…, r)
        return y + F.linear(down, self.lora_B) * self.scaling         # (…, out)

    def delta_weight(self):
        """ΔW = (alpha / rank) · B A, shape (out, in), as an array on the layer's device."""
        return (self.lora_B.data @ self.lora_A.data) * self.weight.dtype.type(self.scaling)

    def merge(self) -> None:
        """Fold ΔW into the frozen weight (W ← W + ΔW): the forward is then a plain Linear."""
        if not self.merged:
            self.weight.data += self.delta_weight()
            self.merged = True

    def unmerge(self) -> None:
        """Take ΔW back out of the weight (W ← W − ΔW), to train or swap the adapter again."""
        if self.merged:
            self.weight.data -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, dropout={self.lora_dropout.p}, merged={self.merged}")


def apply_lora(model: Module, rank: int, alpha: float, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, freeze: bool = True) -> list[str]:
    """Replace every ``Linear`` of ``model`` whose dotted name matches a pattern in ``targets`` by a LoRALinear.

    ``targets``: shell-style patterns (``fnmatch``) on module names, e.g.
    ``"h.*.attn.c_attn"`` or the default ``"h.*"`` (every Linear in the
    transformer blocks). A pattern also matches the modules below a matching
    name. With ``freeze`` every other parameter of the model is frozen too, so
    only the adapters train (unfreeze a new head yourself). Returns the names
    of the adapted layers; raises ValueError if no Linear matched.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, Linear) and _matches(name, patterns)]
    if not chosen:
        raise ValueError(f"apply_lora: no Linear layer matches {patterns}; layers are named like "
                         f"{[n for n, m in model.named_modules() if isinstance(m, Linear)][:4]}")
    if freeze:
        for param in model.parameters():
            param.requires_grad = False
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model
        for part in parent_name.split(".") if parent_name else ():
            parent = getattr(parent, part)
        setattr(parent, child, LoRALinear(linear, rank, alpha, dropout))
    return [name for name, _ in chosen]


def _matches(name: str, patterns) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern) for pattern in patterns for prefix in prefixes)


def lora_layers(model: Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRALinear in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameter_count(model: Module) -> int:
    """Σ rank · (in + out) over the adapted layers: the numbers LoRA trains (a head not included)."""
    return sum(m.lora_A.size + m.lora_B.size for _, m in lora_layers(model))


def merge_lora(model: Module) -> None:
    """Fold every adapter into its weight (see ``LoRALinear.merge``)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: Module) -> None:
    """Take every adapter back out of its weight."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def trainable_state_dict(model: Module) -> dict[str, np.ndarray]:
    """{name: NumPy copy} of the parameters that train (requires_grad): the adapters and any new head."""
    return {name: backend.to_numpy(p.data).copy() for name, p in model.named_parameters() if p.requires_grad}


def lora_config(model: Module) -> dict:
    """The settings that rebuild the adapters: rank, alpha, dropout and the adapted layer names."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = layers[0][1]
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.lora_dropout.p,
            "targets": [name for name, _ in layers]}


def save_adapters(model: Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write the trainable parameters alone (LoRA's A and B, and e.g. a new head) to a safetensors file.

    The LoRA settings go into the file's metadata (``"lora"``: JSON), so
    ``load_adapters`` can rebuild the layers on a fresh copy of the base model.
    A and B are what is stored, merged or not (merging changes only the base weight).
    """
    from ..weights.safetensors import save_file  # noqa: PLC0415 (weights imports nn)

    meta = {"lora": json.dumps(lora_config(model))}
    meta.update(metadata or {})
    save_file(trainable_state_dict(model), path, metadata=meta)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The LoRA settings stored in an adapters file (rank, alpha, dropout, targets)."""
    from ..weights.safetensors import load_metadata  # noqa: PLC0415

    meta = load_metadata(path)
    if "lora" not in meta:
        raise ValueError(f"{path} is not a minillm adapters file (no 'lora' entry in its metadata)")
    return json.loads(meta["lora"])


def load_adapters(model: Module, path: str | os.PathLike, apply: bool = True) -> list[str]:
    """Load an adapters file onto ``model`` (its base weights): adds the LoRA layers first when ``apply``.

    Every array of the file must name a parameter of the (adapted) model with
    the same shape; the base weights are left as they are. Returns the names loaded.
    """
    from ..weights.safetensors import load_file  # noqa: PLC0415

    config = read_adapter_config(path)
    if apply and not lora_layers(model):
        apply_lora(model, config["rank"], config["alpha"], config["dropout"], targets=config["targets"])
    arrays = load_file(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(arrays) - set(params))
    if unknown:
        raise ValueError(f"{path}: arrays {unknown[:5]} name no parameter of this model "
                         f"(was the adapter trained on another base?)")
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(params[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(array.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
    model.load_state_dict(arrays, strict=False)
    for name in arrays:
        params[name].requires_grad = True
    return sorted(arrays)
