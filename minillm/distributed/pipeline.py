"""Pipeline parallel, part 1: cutting a GPT into P contiguous stages.

    stage 0          stage 1        ...   stage P-1
    wte, wpe, drop   h[a1 .. a2)          h[a_{P-1} .. n_layer)
    h[0 .. a1)                            ln_f, output head (wte.weight again when tied)

Each rank builds only its stage (``build_stage``): the other stages' weights
are drawn and thrown away chunk by chunk, so the random stream stays that of
one process and the stage's weights are the single-process model's for the
seed. What crosses a stage boundary, per
micro-batch, is one activation (b, T, C) going forward and its gradient
(b, T, C) coming back: the residual stream between two blocks.

Balance by cost. A stage's time is the sum of its parts' forward+backward
costs, and ``partition`` picks the contiguous cut that minimises the most
expensive stage (exact, by dynamic programming over the cut points). The
costs: on the CPU, FLOPs per token (``layer_costs``: a block 2·12·C² for its
six matrices, with the MLP's 4C, plus 2·2·T·C for q·kᵀ and p·v; the output
head 2·V·C), since the matrix products are most of a CPU step; on a GPU,
measured (``measured_layer_costs``: one block, the embeddings and the head
timed forward and backward on the device, averaged over the ranks so that
all cut alike), because there FLOPs misjudge: the head is one large product
on the tensor cores while a block's attention, norms and GELU are not. For
gpt2-124m at T=1024 FLOPs make the head 4.5 blocks; on an H200 it took 1.4
(48.5 against 35.6 ms per step of 8 micro-batches), and the FLOP cut
(blocks 0–7 | 8–11 + head) ran 285 against 191 ms per step.

The tied embedding. GPT-2's head reuses wte's (V, C) matrix, but wte lives on
the first stage and the head on the last: both keep a copy of the same
weights, ``tied_parameters`` names them, and after each backward their two
gradients are summed over the pair (``PipelineEngine``), so both copies take
the same update and stay equal: the single model's gradient is exactly that
sum of the embedding's and the head's contributions.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

from .. import functional as F
from ..nn import Module
from ..train.graph_step import check_token_batch  # noqa: F401 (the stages check their ids with it; re-exported)

EMBEDDING_PARTS = ("wte", "wpe", "drop")  # on the first stage
HEAD_PARTS = ("ln_f", "lm_head")          # on the last stage


def layer_costs(config, seq_len: int) -> tuple[list[float], float, float]:
    """(cost of each block, of the embeddings, of the head), in FLOPs per token (forward)."""
    C, T = config.d_model, seq_len
    hidden = config.mlp_hidden or 4 * C
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    up = 2 * hidden if config.mlp == "swiglu" else hidden
    block = 2 * (C * (q + 2 * kv) + q * C + C * up + hidden * C) + 2 * 2 * T * q
    head = 2 * config.vocab_size * C
    return [float(block)] * config.n_layer, 0.0, float(head)


def measured_layer_costs(config, device, comm=None, seq_len: int | None = None, micro_batch: int = 1,
                         repeats: int = 3) -> tuple[list[float], float, float]:
    """(cost of each block, of the embeddings, of the head) as ``layer_costs`` gives them, but measured:
    the seconds of one forward + backward of ``micro_batch`` × ``seq_len`` tokens through one block, the
    embeddings and the head (final norm, output matrix, cross-entropy), on ``device`` in the precision
    in force, the best of ``repeats`` after a warm-up. With ``comm`` each rank measures on its own
    device and the ranks average their figures (an all-reduce), so every rank cuts the same stages.
    The parts are drawn under a saved CPU stream, put back after: the weights built next are the same.
    """
    import time  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from .. import backend  # noqa: PLC0415
    from ..models.gpt import embedding_modules, head_modules, transformer_block  # noqa: PLC0415
    from ..tensor import Tensor  # noqa: PLC0415

    T, C = seq_len or config.context_length, config.d_model
    xp = backend.module_for(device)
    stream = backend.get_rng_state()
    try:
        block = transformer_block(config, device=device)
        wte, wpe, _ = embedding_modules(config, device=device)
        ln_f, lm_head = head_modules(config, device=device)
    finally:
        backend.set_rng_state(stream)
    ids = xp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (micro_batch, T)))
    activation = xp.asarray(np.random.default_rng(1).standard_normal((micro_batch, T, C)), dtype=wte.weight.dtype)
    output = (lm_head or wte).weight                                   # (V, C): tied or not, the same product

    def seconds(forward) -> float:
        """Best time of forward-then-backward; gradients dropped after each run."""
        best = float("inf")
        for attempt in range(repeats + 1):                              # the first one warms up
            backend.synchronize(device)
            start = time.perf_counter()
            forward().backward()
            backend.synchronize(device)
            if attempt:
                best = min(best, time.perf_counter() - start)
            for module in (block, wte, wpe, ln_f, lm_head):
                for p in () if module is None else module.parameters():
                    p.grad = None
        return best

    def stream_in():
        return Tensor(activation, requires_grad=True)

    def embed():
        x = wte(ids)
        return (x if wpe is None else x + wpe.weight[:T]).sum()

    def head():
        logits = F.linear(ln_f(stream_in()), output)
        return F.cross_entropy(logits, ids)

    costs = [seconds(lambda: block(stream_in()).sum()), seconds(embed), seconds(head)]
    if comm is not None:
        shared = xp.asarray(costs, dtype=np.float32)
        comm.all_reduce(shared, "sum")
        comm.synchronize()
        costs = [float(c) / comm.size for c in backend.to_numpy(shared)]
    block_cost, embed_cost, head_cost = costs
    return [block_cost] * config.n_layer, embed_cost, head_cost


def partition(costs: list[float], stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Cut ``costs`` into ``stages`` contiguous non-empty runs minimising the largest run's cost.

    ``first_extra``/``last_extra`` are added to the first/last run (embeddings,
    head). Returns [(start, end), ...] half-open ranges. Exact: best[k][i] is
    the least possible maximum when the first i items go to k stages.

    >>> partition([1, 1, 1, 1], 2, last_extra=2)
    [(0, 3), (3, 4)]
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {stages} pipeline stages: need 1 <= --pp <= n_layer ({n})")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def run_cost(i: int, j: int, k: int) -> float:  # items [i, j) as stage k (0-based)
        return prefix[j] - prefix[i] + (first_extra if k == 0 else 0.0) + (last_extra if k == stages - 1 else 0.0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], run_cost(i, j, k - 1))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [], n
    for k in range(stages, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    return bounds[::-1]


def stage_bounds(config, stages: int, seq_len: int | None = None, costs=None) -> list[tuple[int, int]]:
    """The block range of each stage of a GPT, balanced by ``costs`` ((blocks, embeddings, head):
    ``measured_layer_costs``'), by default ``layer_costs``' FLOPs."""
    blocks, embed, head = costs or layer_costs(config, seq_len or config.context_length)
    return partition(blocks, stages, embed, head)


class PipelineStage(Module):
    """One stage of a GPT: the modules of ``model`` it owns, under the model's own names.

    ``stage(ids)`` on the first stage, ``stage(x)`` (a (b, T, C) activation)
    on the others; the last stage returns the logits, or ``(logits, loss)``
    with ``targets``. Parameter names are the full model's (``h.7.ln_1.weight``),
    so a checkpoint is the union of the stages' state dicts.
    """

    def __init__(self, model, stage: int, stages: int, bounds: list[tuple[int, int]] | None = None):
        super().__init__()
        if not 0 <= stage < stages:
            raise ValueError(f"stage {stage} is not in 0..{stages - 1}")
        bounds = bounds or stage_bounds(model.config, stages)
        self.config, self.stage, self.stages = model.config, stage, stages
        self.start, self.end = bounds[stage]
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        if self.is_first:
            for name in EMBEDDING_PARTS:
                setattr(self, name, getattr(model, name))
        self.h = Module()  # children named by their index in the whole model
        for index in range(self.start, self.end):
            setattr(self.h, str(index), model.h[index])
        if self.is_last:
            self.ln_f = model.ln_f
            if model.lm_head is not None:
                self.lm_head = model.lm_head
            elif not self.is_first:
                self.wte = model.wte  # the tied head's weight: a second copy, kept equal (see module doc)
        self.blocks = [model.h[i] for i in range(self.start, self.end)]

    @property
    def output_weight(self):
        return self.wte.weight if getattr(self, "lm_head", None) is None else self.lm_head.weight

    def tied_parameters(self) -> list:
        """Parameters that another stage also holds (the tied wte on the first and last stage)."""
        if self.stages > 1 and self.config.tie_embeddings and (self.is_first or self.is_last):
            return [self.wte.weight]
        return []

    def forward(self, inputs, targets=None):
        """This stage's part of the model's forward: token ids (b, T) or the previous stage's
        activations (b, T, C) in; activations out, or on the last stage the logits (and the
        loss with ``targets``). The schedule runs it inside ``backend.ids_checked_on_host()``
        (ids checked by ``check_token_batch``): the ops' own range checks, one GPU sync each,
        would stall the host until this GPU has drained, including the receive it waits
        on, and so serialise the stages."""
        if self.is_first:
            T = inputs.shape[1]
            x = self.wte(inputs)                                   # (b, T, C)
            if self.wpe is not None:
                x = x + self.wpe.weight[0:T]                       # (T, C) broadcast over the batch
            x = self.drop(x)
        else:
            x = inputs                                             # (b, T, C) from the previous stage
        for index, block in zip(range(self.start, self.end), self.blocks):
            x = block(x, layer_index=index)                        # (b, T, C)
        if not self.is_last:
            return x
        logits = F.linear(self.ln_f(x), self.output_weight)        # (b, T, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits, targets)


def build_stage(config, stage: int, stages: int, *, device=None, dtype=None, seq_len: int | None = None,
                own_stream: bool = False, costs=None) -> PipelineStage:
    """This rank's stage of ``GPT(config)``, built by itself: no other stage's weights are ever held.

    The parts are built in ``GPT.__init__``'s order (embeddings, blocks 0 ..
    n_layer-1, head: ``embedding_modules``, ``transformer_block``,
    ``head_modules``). By default every weight comes from the CPU stream, as in
    one process: the stage's own parts are drawn there and moved to ``device``;
    the other stages' parts are built under ``nn.layers.draws_discarded()``,
    which draws their samples in chunks and throws them away. So the stream
    reaches each owned part in the state ``GPT(config)`` would, the stage's
    weights are bit for bit the single-process model's for the seed in force,
    and the stream ends where ``GPT(config)`` leaves it (later dropout masks
    agree too). The last stage of a tied model draws its copy of wte in
    place, the same values as the first stage's (wpe, drawn with it, is
    dropped at once). Memory: the stage plus one chunk of samples; time: every
    rank still draws all the model's samples on the host (~10 ns each).

    ``own_stream=True`` skips the other stages entirely and draws the stage's
    weights by ``device``'s own stream (``nn.layers.init_on_device``): no host
    work at all, what a ~10B model needs (10^10 samples, ~110 s per rank on the
    host). The price: the weights are not the single-process model's, and the
    last stage's tied copy is drawn apart, so ``PipelineEngine`` broadcasts the
    first stage's over the tied pair.
    """
    from ..models.gpt import embedding_modules, head_modules, transformer_block  # noqa: PLC0415
    from ..nn.layers import draws_discarded, init_on_device  # noqa: PLC0415

    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is not in 0..{stages - 1}")
    bounds = stage_bounds(config, stages, seq_len, costs)            # costs: see stage_bounds
    start, end = bounds[stage]
    first, last = stage == 0, stage == stages - 1
    init = dict(device=device, dtype=dtype)

    def part(owned: bool, make):
        """``make()`` if this stage owns the part; else None, its draws made and discarded (host stream)."""
        if owned:
            return make()
        if not own_stream:
            with draws_discarded():
                make()
        return None

    parts = SimpleNamespace(config=config, lm_head=None)
    with init_on_device() if own_stream else contextlib.nullcontext():
        embeddings = part(first or (last and config.tie_embeddings),   # the last stage: the tied copy of wte
                          lambda: embedding_modules(config, **init))
        if embeddings is not None:
            parts.wte, parts.wpe, parts.drop = embeddings
        parts.h = {index: part(start <= index < end, lambda: transformer_block(config, **init))
                   for index in range(config.n_layer)}
        head = part(last, lambda: head_modules(config, **init))   # drawn elsewhere too: the stream ends alike
        if head is not None:
            parts.ln_f, parts.lm_head = head
    return PipelineStage(parts, stage, stages, bounds)   # takes the parts it owns from a model-like object
