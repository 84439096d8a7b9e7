"""Tensor parallelism (Megatron-LM): each block's matrices split across the T ranks of a group.

A transformer sub-block (attention, or the MLP) is two matrix products with
something shape-preserving per column in between. Split the FIRST matrix by
columns (output features) and the SECOND by rows (input features):

    MLP:   x (B, T, C)  --[c_fc by columns: rank r holds rows r of W1 (4C/T, C)]-->  h_r (B, T, 4C/T)
           gelu(h_r) acts per column: no communication
           h_r --[c_proj by rows: rank r holds W2[:, r] (C, 4C/T)]-->  partial y_r (B, T, C)
           y = Σ_r y_r  (+ bias once)                                    ONE all-reduce forward

    attention: c_attn (q, k, v) by columns = by head groups (rank r owns heads
           r·H/T … (r+1)·H/T − 1 of q, of k and of v); attention per head needs
           no communication; c_proj by rows, then the same one all-reduce.

Two conjugate operations put the communication in the graph, each an op with
a hand-written backward like every other op:

    f = CopyToTensorParallel:      forward y = x (x replicated)      backward dx = Σ_r dy_r   (all-reduce)
    g = ReduceFromTensorParallel:  forward y = Σ_r x_r (all-reduce)  backward dx_r = dy       (identity)

Why (L is the loss, the same on every rank): g's output feeds replicated work,
so each rank's dL/dy is the whole gradient, and y = Σ x_r gives dL/dx_r = dL/dy.
f's output feeds a rank's own columns, so rank r only knows the part of dL/dx
that flows through its columns; x reaches every column, so dL/dx = Σ_r (that
part): an all-reduce. Each sub-block therefore costs one all-reduce of a
(B, T, C) activation forward (g) and one backward (f), and everything outside
the blocks (embeddings, LayerNorms, the head) runs replicated and gets identical
gradients on every rank.

The model stays one ordinary GPT: ``shard_gpt`` swaps each block's four
Linears for their parallel versions holding this rank's shard, and
``SHARD_SPECS`` says how every sharded parameter is cut, so state (model and
optimizer) gathers back into an ordinary checkpoint and shards again on load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend
from .. import functional as F
from ..nn import Linear, Module
from ..nn.parameter import Parameter
from ..tensor import Function, Tensor

# ================================================================ the two conjugate ops


class CopyToTensorParallel(Function):
    """f: forward y = x; backward dx = all-reduce_sum(dy) over the tensor-parallel group.

    Put in front of a column-parallel layer: each rank's columns contribute a
    part of the input's gradient, and the input was shared by all of them.
    """

    def __init__(self, comm):
        self.comm = comm

    def forward(self, x):
        return x                                    # (…, C), the same array on every rank

    def backward(self, grad):
        total = grad.copy()                         # never reduce in place: grad may be shared with other inputs
        self.comm.all_reduce(total, op="sum")
        return (total,)


class ReduceFromTensorParallel(Function):
    """g: forward y = all-reduce_sum(x) over the tensor-parallel group; backward dx = dy.

    Put after a row-parallel layer: each rank holds a partial sum of the output.
    """

    def __init__(self, comm):
        self.comm = comm

    def forward(self, x):
        total = x.copy()                            # the input stays this rank's partial sum
        self.comm.all_reduce(total, op="sum")
        return total

    def backward(self, grad):
        return (grad,)


def copy_to_tensor_parallel(x: Tensor, comm) -> Tensor:
    """f(x): identity forward, all-reduce backward."""
    return CopyToTensorParallel.apply(x, comm=comm)


def reduce_from_tensor_parallel(x: Tensor, comm) -> Tensor:
    """g(x): all-reduce forward, identity backward."""
    return ReduceFromTensorParallel.apply(x, comm=comm)


# ================================================================ how parameters are cut


@dataclass(frozen=True)
class ShardSpec:
    """How a full parameter is cut into T shards.

    ``axis``: the axis that is split. ``parts``: the axis holds that many
    equal blocks side by side (c_attn's [q | k | v]: 3), each split into T
    pieces, and rank r keeps piece r of every block, so that it owns whole
    heads of q, of k and of v.
    """

    axis: int
    parts: int = 1

    def shard(self, full, rank: int, size: int):
        """Rank ``rank``'s piece of ``full`` (a contiguous copy)."""
        xp = backend.array_module(full)
        n = full.shape[self.axis]
        if n % (self.parts * size):
            raise ValueError(f"cannot split an axis of {n} into {self.parts} x {size} equal pieces")
        blocks = xp.split(full, self.parts * size, axis=self.axis)      # parts*size pieces, block-major
        mine = [blocks[part * size + rank] for part in range(self.parts)]
        return xp.ascontiguousarray(xp.concatenate(mine, axis=self.axis))

    def join(self, shards: list):
        """Inverse of ``shard``: the full array from the T shards in rank order."""
        xp = backend.array_module(shards[0])
        pieces = [xp.split(s, self.parts, axis=self.axis) for s in shards]   # [rank][part]
        return xp.concatenate([pieces[r][part] for part in range(self.parts) for r in range(len(shards))],
                              axis=self.axis)


COLUMN = ShardSpec(axis=0)          # Linear weight (out, in) split by output rows; its bias by the same rows
QKV_COLUMN = ShardSpec(axis=0, parts=3)
ROW = ShardSpec(axis=1)             # Linear weight split by input columns (bias: replicated)

# parameter-name suffix -> how a GPT block's parameters are cut (everything else is replicated)
SHARD_SPECS: dict[str, ShardSpec] = {
    "attn.c_attn.weight": QKV_COLUMN, "attn.c_attn.bias": QKV_COLUMN,
    "attn.c_proj.weight": ROW,
    "mlp.c_fc.weight": COLUMN, "mlp.c_fc.bias": COLUMN,
    "mlp.c_proj.weight": ROW,
}


def shard_spec(name: str) -> ShardSpec | None:
    """The ShardSpec of a GPT parameter name (``h.3.mlp.c_fc.weight``), None if replicated."""
    for suffix, spec in SHARD_SPECS.items():
        if name.endswith("." + suffix) or name == suffix:
            return spec
    return None


# ================================================================ parallel layers


class ColumnParallelLinear(Module):
    """y_r = f(x) @ W_rᵀ + b_r: this rank's output features (B, T, out/T); x is replicated."""

    def __init__(self, weight: Parameter, bias: Parameter | None, comm):
        super().__init__()
        self.weight, self.bias, self.comm = weight, bias, comm    # (out/T, in), (out/T,)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(copy_to_tensor_parallel(x, self.comm), self.weight, self.bias)   # (…, out/T)

    def extra_repr(self) -> str:
        return f"shard {tuple(self.weight.shape)} of {self.comm.size}, column-parallel"


class RowParallelLinear(Module):
    """y = g(x_r @ W_rᵀ) + b: this rank's input features x_r (…, in/T) -> the full output (…, out)."""

    def __init__(self, weight: Parameter, bias: Parameter | None, comm):
        super().__init__()
        self.weight, self.bias, self.comm = weight, bias, comm    # (out, in/T), (out,) replicated

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_tensor_parallel(F.linear(x, self.weight), self.comm)   # (…, out), summed over ranks
        return y if self.bias is None else y + self.bias                       # the bias once, after the sum

    def extra_repr(self) -> str:
        return f"shard {tuple(self.weight.shape)} of {self.comm.size}, row-parallel"


def _sharded(linear: Linear, spec: ShardSpec, bias_spec: ShardSpec | None, comm) -> tuple:
    weight = Parameter(spec.shard(linear.weight.data, comm.rank, comm.size))
    bias = None
    if linear.bias is not None:
        data = linear.bias.data if bias_spec is None else bias_spec.shard(linear.bias.data, comm.rank, comm.size)
        bias = Parameter(data)
    return weight, bias


def check_tensor_parallel(n_head: int, size: int, hidden: int | None = None, dropout: float = 0.0) -> None:
    """The clear errors: heads (and MLP width) must split evenly over ``size`` ranks."""
    if n_head % size:
        raise ValueError(f"--tp {size} does not divide n_head={n_head}: tensor parallelism gives each rank "
                         f"n_head / tp whole attention heads; choose a tp that divides {n_head}")
    if hidden is not None and hidden % size:
        raise ValueError(f"--tp {size} does not divide the MLP width {hidden}")
    if dropout and size > 1:
        raise ValueError("--tp with dropout > 0 is not supported: the replicated parts of the model would "
                         "need the same dropout masks on every tensor-parallel rank; use --dropout 0")


def shard_gpt(model, comm):
    """Turn a (full, replicated) GPT into this rank's tensor-parallel shard, in place; returns it.

    Each block's ``attn.c_attn`` / ``mlp.c_fc`` become ColumnParallelLinear and
    ``attn.c_proj`` / ``mlp.c_proj`` RowParallelLinear holding rank
    ``comm.rank``'s piece; ``attn.n_head`` becomes the local head count. The
    parameter names are unchanged, so the optimizer and checkpoints see the
    same keys, with ``SHARD_SPECS`` shapes.
    """
    config = model.config
    check_tensor_parallel(config.n_head, comm.size, 4 * config.d_model, config.dropout)
    for block in model.h:
        attn, mlp = block.attn, block.mlp
        attn.c_attn = ColumnParallelLinear(*_sharded(attn.c_attn, QKV_COLUMN, QKV_COLUMN, comm), comm)
        attn.c_proj = RowParallelLinear(*_sharded(attn.c_proj, ROW, None, comm), comm)
        attn.n_head = attn.n_head // comm.size                        # heads of this rank
        mlp.c_fc = ColumnParallelLinear(*_sharded(mlp.c_fc, COLUMN, COLUMN, comm), comm)
        mlp.c_proj = RowParallelLinear(*_sharded(mlp.c_proj, ROW, None, comm), comm)
    model.tensor_parallel = comm
    return model


# ================================================================ state: gather and shard


def gather_array(name: str, array, comm, device: str = "cpu"):
    """The full value (NumPy) of parameter ``name`` (or of its optimizer state) from this rank's ``array``.

    A collective over ``comm`` (its buffers live on ``device``): every rank
    calls it for the same names in the same order.
    """
    spec = shard_spec(name)
    if spec is None or comm is None or comm.size == 1:
        return backend.to_numpy(array)
    xp = backend.module_for(device)
    with backend.device_context(device):
        flat = xp.ascontiguousarray(backend.to_device(array, device)).reshape(-1)
        gathered = backend.to_numpy(comm.all_gather(flat))                      # (T * n,) in rank order
    return spec.join(list(gathered.reshape(comm.size, *array.shape)))


def shard_array(name: str, full, rank: int, size: int):
    """Rank ``rank``'s piece of the full array of parameter ``name`` (replicated ones unchanged)."""
    spec = shard_spec(name)
    return full if spec is None or size == 1 else spec.shard(full, rank, size)


def is_replicated(name: str) -> bool:
    """True for parameters every tensor-parallel rank holds whole (embeddings, norms, row biases)."""
    return shard_spec(name) is None
