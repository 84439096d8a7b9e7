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
``gpt_shard_specs`` says how every sharded parameter is cut, so state (model and
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


# ================================================================ the vocabulary-parallel head


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows rank ``rank`` scores (the first ranks get one more if uneven)."""
    base, extra = divmod(vocab_size, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class VocabParallelCrossEntropy(Function):
    """Mean cross-entropy of logits split by vocabulary: rank r holds columns [start, end) of z.

    With z_n the full row of logits and y_n its target (V = Σ_r V_r classes):

        ℓ_n = log Σ_v exp(z_nv) − z_n,y_n = log S_n + m_n − z_n,y_n,    m_n = max_v z_nv
        S_n = Σ_r Σ_{v in r} exp(z_nv − m_n)

    so the forward needs three all-reduces of an (N,) vector: the max (m), the
    sum (S), and the target logit (held by one rank; the others add 0). The
    backward needs none: dℓ_n/dz_nv = softmax(z_n)_v − [v = y_n], and rank r
    forms it for its own columns from the saved exp(z − m) / S. The loss is the
    mean over the rows whose target is not ``ignore_index``, like F.cross_entropy.
    """

    def __init__(self, targets, comm, start: int, ignore_index: int = -100):
        self.targets, self.comm, self.start, self.ignore_index = targets, comm, start, ignore_index

    def forward(self, logits):
        xp = backend.array_module(logits)
        z = logits.reshape(-1, logits.shape[-1])                    # (N, V_r) this rank's columns
        targets = self.targets.reshape(-1)                          # (N,) ids in the whole vocabulary
        valid = targets != self.ignore_index
        local = targets - self.start
        mine = valid & (local >= 0) & (local < z.shape[1])          # rows whose target column is here
        row_max = xp.ascontiguousarray(z.max(axis=1))               # (N,)
        self.comm.all_reduce(row_max, op="max")                     # m_n over the whole vocabulary
        softmax = xp.exp(z - row_max[:, None])                      # (N, V_r) exp(z − m)
        sum_exp = xp.ascontiguousarray(softmax.sum(axis=1))
        self.comm.all_reduce(sum_exp, op="sum")                     # S_n
        rows = xp.arange(z.shape[0])
        target_logit = xp.where(mine, z[rows, xp.where(mine, local, 0)], 0).astype(z.dtype)
        target_logit = xp.ascontiguousarray(target_logit)
        self.comm.all_reduce(target_logit, op="sum")                # z_n,y_n (one rank contributed it)
        losses = xp.where(valid, xp.log(sum_exp) + row_max - target_logit, 0)
        count = valid.sum().astype(z.dtype)
        softmax /= sum_exp[:, None]
        self.save(softmax, rows, local, mine, valid, count, logits.shape)
        return xp.asarray(losses.sum() / xp.maximum(count, 1))

    def backward(self, grad):
        softmax, rows, local, mine, valid, count, shape = self.saved
        xp = backend.array_module(softmax)
        row_grad = xp.where(valid, grad / xp.maximum(count, 1), 0).astype(softmax.dtype)   # (N,)
        grad_z = softmax                                            # reused in place: g_n · softmax_n
        grad_z *= row_grad[:, None]
        column = xp.where(mine, local, 0)                            # rows not ours subtract 0 from column 0
        grad_z[rows, column] -= xp.where(mine, row_grad, 0)         # − g_n at the target, where it is ours
        return (grad_z.reshape(shape),)


def vocab_parallel_head(x: Tensor, weight: Tensor, targets, comm, ignore_index: int = -100):
    """(this rank's logits (…, V_r), the mean cross-entropy) of the output head, split by vocabulary.

    ``weight`` is the whole (V, C) output matrix (wte when tied), replicated;
    rank r scores rows [start, end) of it. Both inputs go through f: x reaches
    every rank's rows, and so does ``weight`` (each rank's head gradient lands
    in its own rows only; f's all-reduce sums them, and the replicated
    embedding's own gradient is added to that on every rank alike).
    """
    start, end = vocab_range(weight.shape[0], comm.rank, comm.size)
    rows = copy_to_tensor_parallel(weight, comm)[start:end]          # (V_r, C)
    logits = F.linear(copy_to_tensor_parallel(x, comm), rows)        # (…, V_r)
    if targets is None:
        return logits, None
    targets = backend.to_device(targets.data if isinstance(targets, Tensor) else targets, logits.device)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match the ids' {tuple(logits.shape[:-1])}")
    loss = VocabParallelCrossEntropy.apply(logits, targets=targets, comm=comm, start=start,
                                           ignore_index=ignore_index)
    return logits, loss


class TensorParallelGPT:
    """Mixin put in front of a GPT's class by ``shard_gpt``: the output head is vocabulary-parallel.

    ``forward`` is GPT's, except for the last two ops: instead of all V logits
    and the cross-entropy on every rank (replicated: the largest matrix product
    of gpt2-124m), each rank scores its V/T rows of the head and the loss comes
    from ``VocabParallelCrossEntropy``. The logits it returns are this rank's
    columns only.
    """

    def forward(self, ids, targets=None, cache=None):
        if cache is not None:
            raise ValueError("a tensor-parallel model does not generate: sample from its (gathered) checkpoint")
        x = self.hidden_states(ids)                                  # (B, T, C), replicated
        logits, loss = vocab_parallel_head(x, self.output_weight, targets, self.tensor_parallel)
        return logits if targets is None else (logits, loss)


# ================================================================ how parameters are cut


@dataclass(frozen=True)
class ShardSpec:
    """How a full parameter is cut into T shards.

    ``axis``: the axis that is split. ``blocks``: the axis holds blocks side by
    side whose widths are in these proportions (c_attn's [q | k | v]: (H, Hkv,
    Hkv); SwiGLU's c_fc [gate | up]: (1, 1)); each block is split into T equal
    pieces and rank r keeps piece r of every block, so that it owns whole heads
    of q, of k and of v (and matching gate and up columns).
    """

    axis: int
    blocks: tuple[int, ...] = (1,)

    def _block_edges(self, n: int, size: int) -> list[int]:
        unit, rest = divmod(n, sum(self.blocks))
        widths = [b * unit for b in self.blocks]
        if rest or any(w % size for w in widths):
            raise ValueError(f"cannot split an axis of {n} as blocks {self.blocks} into {size} equal pieces each")
        return list(np.cumsum([0] + widths))

    def shard(self, full, rank: int, size: int):
        """Rank ``rank``'s piece of ``full`` (a contiguous copy)."""
        xp = backend.array_module(full)
        edges = self._block_edges(full.shape[self.axis], size)
        mine = []
        for start, stop in zip(edges[:-1], edges[1:]):
            piece = (stop - start) // size
            index = [slice(None)] * full.ndim
            index[self.axis] = slice(start + rank * piece, start + (rank + 1) * piece)
            mine.append(full[tuple(index)])
        return xp.ascontiguousarray(xp.concatenate(mine, axis=self.axis))

    def join(self, shards: list):
        """Inverse of ``shard``: the full array from the T shards in rank order."""
        xp = backend.array_module(shards[0])
        size = len(shards)
        full_edges = self._block_edges(shards[0].shape[self.axis] * size, size)
        edges = [e // size for e in full_edges]                         # block edges within one shard
        pieces = []
        for start, stop in zip(edges[:-1], edges[1:]):
            for shard in shards:
                index = [slice(None)] * shard.ndim
                index[self.axis] = slice(start, stop)
                pieces.append(shard[tuple(index)])
        return xp.concatenate(pieces, axis=self.axis)


def gpt_shard_specs(config) -> dict[str, ShardSpec]:
    """Parameter-name suffix -> how a block's parameter is cut (every other parameter is replicated).

    Column-parallel (output rows split): c_attn and c_fc, weights and biases.
    Row-parallel (input columns split): the two c_proj weights; their biases
    are added after the all-reduce, whole, on every rank.
    """
    heads = config.n_head
    kv_heads = config.n_kv_head or heads
    qkv = ShardSpec(axis=0, blocks=(heads, kv_heads, kv_heads))
    fc = ShardSpec(axis=0, blocks=(1, 1) if config.mlp == "swiglu" else (1,))
    row = ShardSpec(axis=1)
    return {"attn.c_attn.weight": qkv, "attn.c_attn.bias": qkv, "attn.c_proj.weight": row,
            "mlp.c_fc.weight": fc, "mlp.c_fc.bias": fc, "mlp.c_proj.weight": row}


def shard_spec(config, name: str) -> ShardSpec | None:
    """How the whole model's parameter ``name`` (``h.3.attn.c_attn.weight``) is cut; None: replicated."""
    for suffix, spec in gpt_shard_specs(config).items():
        if name.endswith("." + suffix):
            return spec
    return None


def model_shard_specs(model) -> dict[str, ShardSpec]:
    """{full parameter name: ShardSpec} for every sharded parameter of a GPT (names as in its state_dict)."""
    specs = {name: shard_spec(model.config, name) for name, _ in model.named_parameters()}
    return {name: spec for name, spec in specs.items() if spec is not None}


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


def _sharded(linear: Linear, spec: ShardSpec, bias_sharded: bool, comm) -> tuple:
    weight = Parameter(spec.shard(linear.weight.data, comm.rank, comm.size))
    bias = None
    if linear.bias is not None:
        data = spec.shard(linear.bias.data, comm.rank, comm.size) if bias_sharded else linear.bias.data
        bias = Parameter(data)
    return weight, bias


def check_tensor_parallel(config, size: int) -> None:
    """The clear errors: heads and the MLP width must split evenly over ``size`` ranks."""
    kv_heads = config.n_kv_head or config.n_head
    if config.n_head % size or kv_heads % size:
        raise ValueError(f"--tp {size} does not divide n_head={config.n_head}"
                         + (f" and n_kv_head={kv_heads}" if kv_heads != config.n_head else "")
                         + ": tensor parallelism gives each rank whole attention heads; choose a --tp that divides "
                         + f"{config.n_head}")
    if config.dropout and size > 1:
        raise ValueError("--tp with dropout > 0 is not supported: the replicated parts of the model would "
                         "need the same dropout masks on every tensor-parallel rank; use --dropout 0")


def shard_gpt(model, comm, vocab_parallel: bool = True):
    """Turn a (full, replicated) GPT into this rank's tensor-parallel shard, in place; returns it.

    Each block's ``attn.c_attn`` / ``mlp.c_fc`` become ColumnParallelLinear and
    ``attn.c_proj`` / ``mlp.c_proj`` RowParallelLinear holding rank
    ``comm.rank``'s piece; the attention's head counts become the local ones.
    The parameter names are unchanged, so the optimizer and checkpoints see the
    same keys; ``model.shard_specs`` says how each sharded one was cut. With
    ``vocab_parallel`` the output head and the loss are split by vocabulary too
    (``TensorParallelGPT``); the embedding tables stay whole on every rank.
    ``model`` may also be a pipeline stage (``PipelineStage``): its own blocks
    are sharded, and its head stays whole (the stage computes it).
    """
    config = model.config
    check_tensor_parallel(config, comm.size)
    suffixes = gpt_shard_specs(config)
    stage_blocks = getattr(model, "blocks", None)                    # a PipelineStage's blocks, else a GPT's
    for block in model.h if stage_blocks is None else stage_blocks:
        attn, mlp = block.attn, block.mlp
        if mlp.c_fc.weight.shape[0] % comm.size:
            raise ValueError(f"--tp {comm.size} does not divide the MLP width {mlp.c_fc.weight.shape[0]}")
        attn.c_attn = ColumnParallelLinear(*_sharded(attn.c_attn, suffixes["attn.c_attn.weight"], True, comm), comm)
        attn.c_proj = RowParallelLinear(*_sharded(attn.c_proj, suffixes["attn.c_proj.weight"], False, comm), comm)
        attn.n_head //= comm.size                                    # this rank's heads
        attn.n_kv_head //= comm.size
        mlp.c_fc = ColumnParallelLinear(*_sharded(mlp.c_fc, suffixes["mlp.c_fc.weight"], True, comm), comm)
        mlp.c_proj = RowParallelLinear(*_sharded(mlp.c_proj, suffixes["mlp.c_proj.weight"], False, comm), comm)
    model.shard_specs = model_shard_specs(model)
    model.tensor_parallel = comm
    if vocab_parallel and stage_blocks is None:
        # the same object, its class now GPT with the vocabulary-parallel forward in front (module doc)
        model.__class__ = type(f"TensorParallel{type(model).__name__}", (TensorParallelGPT, type(model)), {})
    return model


# ================================================================ state: gather and shard


def gather_array(array, spec: ShardSpec | None, comm, device: str = "cpu"):
    """The full value (NumPy) of a parameter (or of its optimizer state) from this rank's ``array``.

    ``spec`` None: replicated, returned as is. A collective over ``comm`` (its
    buffers on ``device``): every rank calls it for the same arrays in the same order.
    """
    if spec is None or comm is None or comm.size == 1:
        return backend.to_numpy(array)
    xp = backend.module_for(device)
    with backend.device_context(device):
        flat = xp.ascontiguousarray(backend.to_device(array, device)).reshape(-1)
        gathered = backend.to_numpy(comm.all_gather(flat))                      # (T * n,) in rank order
    return spec.join(list(gathered.reshape(comm.size, *array.shape)))


def shard_array(full, spec: ShardSpec | None, rank: int, size: int):
    """Rank ``rank``'s piece of a full array (replicated ones, ``spec`` None, unchanged)."""
    return full if spec is None or size == 1 else spec.shard(full, rank, size)
