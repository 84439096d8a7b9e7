"""Cross-entropy: log-softmax and negative log-likelihood fused into one op.

For logits z (N, C) (or (B, T, C), flattened to N = B·T rows) and integer
targets t (N,), row n's loss is

    ℓ_n = -log softmax(z_n)[t_n] = logsumexp(z_n) - z_n[t_n],
    logsumexp(z_n) = m_n + log Σ_c exp(z_nc - m_n),   m_n = max_c z_nc

(the max keeps every exponent <= 0: no overflow for logits of 1e4). Rows whose
target is ``ignore_index`` contribute nothing; "mean" divides by the number
of the others. The gradient of ℓ_n is

    dℓ_n/dz_nc = softmax(z_n)_c - [c = t_n]

so with g_n = dL/dℓ_n (g/n_valid for "mean", 0 on ignored rows)

    dL/dz_nc = g_n · (softmax(z_n)_c - [c = t_n]).

Memory: the forward keeps one (N, C) buffer, exp(z - m), and the backward
turns that same buffer into the gradient in place (a scale per row and one
subtraction per row), so a (8192, 50257) float32 loss needs one 1.6 GB buffer
beyond the logits, not five. On a GPU, one CUDA kernel computes the row
losses without any (N, C) buffer and one writes the gradient.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..kernels import loss as kernels
from ..backend import array_module
from ..tensor import Function, Tensor
from .common import as_int_array
from .activation import log_softmax_composed
from .elementwise import where

_REDUCTIONS = ("mean", "sum", "none")


class CrossEntropy(Function):
    """Fused log-softmax + NLL over the last axis of ``logits``; see the module docstring.

    ``targets`` (an integer array of shape logits.shape[:-1], already checked)
    is a constant and gets no gradient.
    """

    float_only = True

    def __init__(self, targets, ignore_index: int = -100, reduction: str = "mean"):
        self.targets, self.ignore_index, self.reduction = targets, ignore_index, reduction

    def forward(self, logits):
        xp = array_module(logits)
        num_classes = logits.shape[-1]
        z = logits.reshape(-1, num_classes)                         # (N, C)
        targets = self.targets.reshape(-1)                          # (N,)
        valid = targets != self.ignore_index                        # (N,)
        safe_targets = xp.where(valid, targets, 0)                  # ignored rows point at class 0
        # logsumexp is kept as the pair (m, log Σ exp(z - m)), never added up: in float32, m + log Σ
        # for logits ~1e4 would round to 1e-3, and exp(z - logsumexp) would inherit that error.
        if kernels.fusable(z):
            losses, row_max, log_sum = kernels.cross_entropy_forward(z, safe_targets, valid)
            exp_shifted = sum_exp = None
        else:
            row_max = z.max(axis=1)                                 # (N,)
            exp_shifted = xp.empty(logits.shape, dtype=logits.dtype)   # the one big buffer, logits' shape,
            # C-ordered whatever the logits' layout, so the (N, C) reshape below is a view, not a copy
            buffer = exp_shifted.reshape(-1, num_classes)           # (N, C) view of it
            xp.subtract(z, row_max[:, None], out=buffer)
            xp.exp(buffer, out=buffer)                              # exp(z - m), all in (0, 1]
            sum_exp = buffer.sum(axis=1)                            # (N,)
            log_sum = xp.log(sum_exp)                               # (N,)
            target_logits = z[xp.arange(z.shape[0]), safe_targets]  # (N,)
            losses = xp.where(valid, log_sum - (target_logits - row_max), 0)           # (N,)
        n_valid = valid.sum().astype(z.dtype)
        self.save(logits, exp_shifted, sum_exp, row_max, log_sum, safe_targets, valid, n_valid)
        if self.reduction == "none":
            return losses.reshape(self.targets.shape)
        total = losses.sum()
        if self.reduction == "mean":
            with np.errstate(invalid="ignore"):                     # every target ignored: 0/0 = nan
                total = total / n_valid
        return xp.asarray(total)

    def backward(self, grad):
        logits, exp_shifted, sum_exp, row_max, log_sum, safe_targets, valid, n_valid = self.saved
        xp = array_module(logits)
        num_classes = logits.shape[-1]
        if self.reduction == "none":
            row_grad = grad.reshape(-1)                             # (N,) dL/dℓ_n
        elif self.reduction == "mean":
            row_grad = xp.broadcast_to(grad / xp.maximum(n_valid, 1.0), valid.shape)
        else:
            row_grad = xp.broadcast_to(grad, valid.shape)
        row_grad = xp.where(valid, row_grad, 0)                     # (N,), 0 on ignored rows
        if exp_shifted is None:                                     # GPU: one kernel writes it all
            return (kernels.cross_entropy_backward(logits, row_max, log_sum, safe_targets, row_grad),)
        # The gradient is returned in the array that has logits' shape (a reshaped view would be
        # copied by the engine), and computed through its (N, C) view.
        if self.saved_buffer_used:                                  # second backward (retain_graph)
            z = logits.reshape(-1, num_classes)
            grad_logits = xp.empty(logits.shape, dtype=logits.dtype)   # C-ordered: grad_z is a view
            grad_z = grad_logits.reshape(-1, num_classes)
            xp.subtract(z, row_max[:, None], out=grad_z)
            grad_z -= log_sum[:, None]
            xp.exp(grad_z, out=grad_z)                              # softmax itself
            scale = row_grad
        else:
            self.saved_buffer_used = True
            grad_logits = exp_shifted                               # reused in place
            grad_z = grad_logits.reshape(-1, num_classes)
            scale = row_grad / sum_exp                              # softmax = exp_shifted / sum_exp
        grad_z *= scale[:, None]                                    # g_n · softmax(z_n)
        grad_z[xp.arange(grad_z.shape[0]), safe_targets] -= row_grad   # - g_n at the target class
        return (grad_logits,)

    saved_buffer_used = False


def _check_targets(logits: Tensor, targets, ignore_index: int, reduction: str):
    """``targets`` as an integer array on the logits' device; clear errors for bad input."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(logits, Tensor):
        raise TypeError(f"cross_entropy: logits must be a Tensor, got {type(logits).__name__}")
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy: logits of shape {logits.shape} have no class axis")
    targets = as_int_array(targets, "cross_entropy", "targets (class ids)")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: targets of shape {targets.shape} do not match logits of shape "
            f"{logits.shape} (expected targets of shape {logits.shape[:-1]})"
        )
    targets = backend.to_device(targets, logits.device)
    num_classes = logits.shape[-1]
    xp = array_module(targets)
    if backend.ids_checked():                                       # checked on the host already
        return xp.ascontiguousarray(targets)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if bad.any():                                                   # one sync on a GPU
        bad_id = int(targets[bad].ravel()[0])
        raise ValueError(
            f"cross_entropy: target id {bad_id} is out of range for {num_classes} classes "
            f"(vocab size {num_classes}: ids must lie in [0, {num_classes - 1}] or equal "
            f"ignore_index={ignore_index})"
        )
    return xp.ascontiguousarray(targets)


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``logits`` (..., C) against integer ``targets`` (...), fused.

    ``reduction``: "mean" over the non-ignored targets (nan if there are none,
    like PyTorch), "sum", or "none" (one loss per target, 0 where ignored).
    Raises TypeError for non-integer targets and ValueError for ids outside
    [0, C) other than ``ignore_index``.
    """
    targets = _check_targets(logits, targets, ignore_index, reduction)
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index, reduction=reduction)


def cross_entropy_composed(logits: Tensor, targets, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """The same loss from primitives: log_softmax_composed, indexing, where, sum / count."""
    targets = _check_targets(logits, targets, ignore_index, reduction)
    xp = array_module(targets)
    num_classes = logits.shape[-1]
    log_probs = log_softmax_composed(logits.reshape(-1, num_classes), axis=-1)   # (N, C)
    flat_targets = targets.reshape(-1)                                           # (N,)
    valid = flat_targets != ignore_index
    picked = log_probs[xp.arange(flat_targets.shape[0]), xp.where(valid, flat_targets, 0)]  # (N,)
    losses = -where(valid, picked, 0.0)                                          # (N,)
    if reduction == "none":
        return losses.reshape(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum()
