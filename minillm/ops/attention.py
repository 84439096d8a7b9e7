"""Scaled dot-product attention: one fused op, and the same function built from primitives.

For queries Q (…, Tq, D), keys K (…, Tk, D) and values V (…, Tk, Dv)
(… = any leading axes, usually (B, H)), with s = scale (1/√D by default):

    S = s · Q Kᵀ                       (…, Tq, Tk)   attention scores
    S[i, j] = −∞ where j > i + Tk − Tq (causal: no query sees a later key)
    P = softmax(S) over keys           (…, Tq, Tk)   each row sums to 1
    P̃ = P ⊙ M / (1 − p)               (dropout with keep mask M; P̃ = P if p = 0)
    O = P̃ V                           (…, Tq, Dv)

Causal masking with Tq < Tk (decoding with a KV cache): the Tq queries are the
LAST Tq positions of the Tk-long sequence, so query i sits at position
i + (Tk − Tq) and attends keys j <= i + (Tk − Tq). With Tq = Tk that is the
usual lower triangle. Tq > Tk with ``causal=True`` is an error (the first
queries would see no key at all).

Backward (rows are queries; Σ_j runs over keys), given dO = dL/dO:

    dV = P̃ᵀ dO                         (…, Tk, Tq) @ (…, Tq, Dv) -> (…, Tk, Dv)
    dP̃ = dO Vᵀ                         (…, Tq, Dv) @ (…, Dv, Tk) -> (…, Tq, Tk)
    dP = dP̃ ⊙ M / (1 − p)
    dS = P ⊙ (dP − rowsum(dP ⊙ P))     softmax backward, row by row; 0 where masked
    dQ = s · dS K                       (…, Tq, Tk) @ (…, Tk, D)  -> (…, Tq, D)
    dK = s · dSᵀ Q                      (…, Tk, Tq) @ (…, Tq, D)  -> (…, Tk, D)

The softmax line: P_ij = e^{S_ij} / Σ_k e^{S_ik}, so ∂P_ij/∂S_il = P_ij (δ_jl − P_il)
and dS_il = Σ_j dP_ij P_ij (δ_jl − P_il) = P_il (dP_il − Σ_j dP_ij P_ij). A masked
key has P = 0, so it gets no gradient and backward needs no mask.

On the CPU the fused op saves Q·s, K, V and P (plus the 1-byte dropout mask):
one (…, Tq, Tk) float buffer. On a GPU it saves only Q·s, K and V (and the
mask) and recomputes P in backward (``RECOMPUTE_PROBS``). It works in place
on the big (…, Tq, Tk) buffers (mask and softmax in the scores buffer, the
softmax backward in the dP buffer). On the CPU it goes tile by tile (blocks of
queries × groups of matrices, ``_tiles``): causal tiles skip the keys no query
of theirs can see, and each tile's softmax passes run in cache; threads share
out the matrices (``_tile_groups``); a tile's mask + softmax and its softmax
backward are one C++ row loop each where kernels/cpu.py can build them (NumPy
passes otherwise). On a GPU one tile covers everything, and the mask + softmax
and the softmax backward are one CUDA kernel each (``minillm/kernels/attention.py``
holds both kinds). Per tile (so per call on a GPU), forward is two GEMMs
(s·Q Kᵀ, P̃ V) + one softmax pass; backward is four GEMMs (dV, dP̃, dQ, dK)
+ one softmax-backward pass where P is kept (the CPU), and five GEMMs + two
passes where P is recomputed first (a GPU: one more GEMM and the softmax kernel
again). Elementwise scalings (s on Q and dQ; dropout's M and 1/(1 − p)) come on
top. tests/ops/test_attention.py counts them.

Grouped-query attention (Llama, Qwen3): K and V may have Hkv heads and Q
Hq = G·Hkv, query heads h·G … h·G + G − 1 sharing key/value head h. Nothing
above changes per head; the op views Q as (N, G, Tq, D) over N = B·Hkv
key/value heads and multiplies each group by its single K and V (``_grouped_matmul``),
and dK, dV become sums over the group, dK_h = s · Σ_g dS_{h,g}ᵀ Q_{h,g} (``_group_summed_matmul``):
the repeated keys and values are never formed.

``scaled_dot_product_attention_composed`` builds the same function from
primitive ops (matmul, transpose, where, softmax_composed, dropout); it is
for reading, and the tests check that the fused op equals it, values and
gradients, dropout included (both draw the mask from ``dropout_keep_mask``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .. import backend, precision
from ..kernels import attention as kernels
from ..kernels.matmul import cpu_gemm_batched
from ..backend import array_module
from ..tensor import Function, Tensor
from .activation import softmax_composed
from .common import CPU_THREADS, PARALLEL_MIN_ELEMENTS, row_ranges, run_parallel
from .elementwise import where
from .embedding import _check_p, dropout, dropout_keep_mask
from .matmul import matmul
from .shape import reshape, transpose


@functools.lru_cache(maxsize=256)
def causal_mask(tq: int, tk: int, device: str = "cpu"):
    """Boolean (Tq, Tk) array, True where query i must NOT see key j: j > i + (Tk − Tq).

    Built once per (Tq, Tk, device) and cached (read-only on the CPU).

    >>> causal_mask(2, 3).astype(int).tolist()
    [[0, 0, 1], [0, 0, 0]]
    """
    xp = backend.module_for(device)
    with backend.device_context(device):
        mask = xp.triu(xp.ones((tq, tk), dtype=bool), k=tk - tq + 1)
    if xp is np:
        mask.flags.writeable = False
    return mask


def _softmax_rows_(scores, causal: bool, compiled: bool = False):
    """In place: scores (…, Tq, Tk) -> P = softmax over keys of the (causally masked) scores.
    ``compiled``: on the CPU, run the C++ row kernel (the op checked ``kernels.cpu_softmax_usable``)."""
    if backend.device_of(scores) != "cpu":
        return kernels.attention_softmax_forward_(scores, causal)   # one launch on the GPU
    _softmax_rows_cpu_(scores, causal, compiled)
    return scores


def _softmax_rows_cpu_(scores, causal: bool, compiled: bool = False) -> None:
    """The CPU's passes over one tile of scores: one C++ row loop when ``compiled``
    (``kernels.cpu_softmax_forward_``: each row's max, exp and sum, scale and mask
    while it is in L1), else NumPy's passes. In NumPy the row maximum is taken with
    ``initial=−∞``: the same value (NaN still propagates), but NumPy then reduces
    short rows with its vectorised loop, 2.4–2.8x faster on a tile's rows of
    128–256 keys (a (16, 128, 128) tile: 200 -> 72 µs; the tile's softmax
    505–534 -> 367–397 µs). In a training step of ``minillm bench train`` the
    forward softmax passes took 40.5 -> 36.2 ms of CPU time (median of 10 steps
    each, alternating in one process, load 0.8–1.3): the tiles are colder there."""
    if compiled:
        kernels.cpu_softmax_forward_(scores, causal)
        return
    tq, tk = scores.shape[-2:]
    if causal:  # every masked key is among the last Tq: mask that (Tq, Tq) corner only
        corner, future = scores[..., tk - tq:], causal_mask(tq, tq)
        # −∞ above the diagonal (e^{−∞} = 0), set rather than added: a NaN or +∞ score of a key the
        # query does not see (NaN + −∞ = NaN) must not reach its row, as the C++ rows never read it
        np.copyto(corner, -np.inf, where=future)
    scores -= np.max(scores, axis=-1, keepdims=True, initial=-np.inf)   # (…, Tq, 1): stable exp
    np.exp(scores, out=scores)
    row_sums = scores @ np.ones(tk, dtype=scores.dtype)             # (…, Tq), through BLAS: ~4x .sum(-1)
    scores *= (1 / row_sums)[..., None]
    if causal and np.isnan(row_sums).any():     # a NaN row (a NaN or ±∞ score it sees): 0 · NaN on its
        np.copyto(corner, 0, where=future)      # masked keys; they stay 0 (so their dK, dV stay finite)


def _softmax_rows_backward_(grad_probs, probs, causal: bool, keep=None, keep_scale=1.0, compiled: bool = False):
    """In place: grad_probs (dL/dP̃) -> dL/dS = P ⊙ (dP − rowsum(dP ⊙ P)), dP = dP̃ ⊙ M · keep_scale.
    ``compiled``: on the CPU, run the C++ row kernel (the op checked ``kernels.cpu_softmax_usable``)."""
    if backend.device_of(grad_probs) != "cpu":
        return kernels.attention_softmax_backward_(grad_probs, probs, causal, keep, keep_scale)
    _softmax_rows_backward_cpu_(grad_probs, probs, keep, keep_scale, causal, compiled)
    return grad_probs


def _softmax_rows_backward_cpu_(grad_probs, probs, keep, keep_scale, causal: bool = False,
                                compiled: bool = False) -> None:
    """One tile: a C++ row loop when ``compiled`` (each row's dot and dS in L1; the masked keys,
    where P = 0, skipped and set to 0), else NumPy's passes over the whole tile."""
    if compiled:
        kernels.cpu_softmax_backward_(grad_probs, probs, causal, keep, keep_scale)
        return
    if keep is not None:
        np.multiply(grad_probs, keep, out=grad_probs)
        grad_probs *= keep_scale
    tq, tk = probs.shape[-2:]
    if causal:  # dP of the keys a query does not see (a NaN/∞ value there) is no part of its row's dot
        corner, future = grad_probs[..., tk - tq:], causal_mask(tq, tq)
        np.copyto(corner, 0, where=future)
    row_dot = np.einsum("...ij,...ij->...i", grad_probs, probs)     # (…, Tq): no (…, Tq, Tk) temporary
    grad_probs -= row_dot[..., None]
    grad_probs *= probs
    if causal and not np.isfinite(row_dot).all():   # (0 − ∞ or NaN) · 0 on the masked keys: they stay 0
        np.copyto(corner, 0, where=future)


# On the CPU the (N, Tq, Tk) score matrices are processed in tiles of at most this many
# query rows and (about) this many scores: small enough for a tile's softmax passes to run
# in cache, large enough for good GEMMs (see _tiles). The matrices are shared out between
# CPU threads, each running its tiles with a single-threaded BLAS (``_tile_groups``).
CPU_TILE_ROWS = 128
CPU_TILE_SCORES = 1 << 18


def _tiles(n: int, tq: int, tk: int, causal: bool, device: str, start: int = 0,
           group: int = 1) -> list[tuple[int, int, int, int, int]]:
    """Tiles (b0, b1, r0, r1, k_end): matrices b0..b1-1, queries r0..r1-1, keys 0..k_end-1.

    Causal query i sees keys j <= i + (Tk − Tq), so a tile of queries ending at r1
    never looks past k_end = r1 + (Tk − Tq): the all-masked keys right of it are
    skipped (at T = 256 in rows of 128 that is 1/4 of the matmul and softmax work).
    A tile is itself a causal attention of r1 − r0 queries over k_end keys, the
    queries again being the last positions. Small tiles also keep the softmax
    passes in cache. On a GPU one tile covers everything: there the number of
    kernel launches matters more than either. ``start`` offsets the matrices.
    With grouped-query attention a "matrix" is one key/value head and the ``group``
    query heads that share it: a tile holds ``group`` score blocks per matrix.
    """
    if device != "cpu":
        return [(start, start + n, 0, tq, tk)]
    tiles = []
    for r0 in range(0, tq, CPU_TILE_ROWS):
        r1 = min(r0 + CPU_TILE_ROWS, tq)
        k_end = r1 + tk - tq if causal else tk
        per_tile = max(1, CPU_TILE_SCORES // max(1, group * (r1 - r0) * k_end))   # matrices per tile
        tiles += [(b0, min(b0 + per_tile, start + n), r0, r1, k_end) for b0 in range(start, start + n, per_tile)]
    return tiles


def _tile_groups(n: int, tq: int, tk: int, causal: bool, device: str, group: int = 1) -> list[list[tuple]]:
    """The tiles, in groups over disjoint matrices that threads can run at the same time.

    The CPU's elementwise passes use one core each and its BLAS splits every small
    product between its own threads, poorly; so each CPU thread takes a share of
    the matrices and runs all their work (products and softmax) with a
    single-threaded BLAS. Where BLAS threads cannot be set, and on a GPU, one group.
    """
    if device != "cpu" or not backend.can_limit_blas_threads():
        return [_tiles(n, tq, tk, causal, device, group=group)]
    return [_tiles(part.stop - part.start, tq, tk, causal, device, start=part.start, group=group)
            for part in row_ranges(n, group * tq * tk)]


def _run_tile_groups(work, groups) -> None:
    """``work(tiles)`` for every group: directly for one group, else in threads, BLAS single-threaded."""
    if len(groups) == 1:
        work(groups[0])
        return
    with backend.blas_threads(1):
        run_parallel(work, groups)


def _cpu_operands(arrays, scale=None):
    """The (…, T, D) arrays with their leading axes merged, (N, T, D), ``arrays[0]`` times
    ``scale`` when given. Views where the leading axes merge and rows are contiguous;
    otherwise copies (the model's heads are strided views of its qkv projection), made
    by both cores at once over the first axis rather than one after another on one.
    """
    results = [None] * len(arrays)
    jobs = []                                    # (index, destination in the source's shape)
    for i, a in enumerate(arrays):
        dims = [(size, stride) for size, stride in zip(a.shape[:-2], a.strides[:-2]) if size != 1]
        mergeable = all(s0 == n1 * s1 for (_, s0), (n1, s1) in zip(dims, dims[1:]))
        if mergeable and a.strides[-1] == a.itemsize and not (i == 0 and scale is not None):
            results[i] = a.reshape(math.prod(a.shape[:-2]), *a.shape[-2:])   # (not -1: T or D may be 0)
        else:
            jobs.append((i, np.empty(a.shape, dtype=a.dtype)))
    if jobs:
        threads = CPU_THREADS if sum(out.size for _, out in jobs) >= PARALLEL_MIN_ELEMENTS else 1

        def fill(thread):                        # this thread's share of each array's first axis
            for i, out in jobs:
                source, out = (arrays[i], out) if out.ndim > 2 else (arrays[i][None], out[None])
                part = slice(out.shape[0] * thread // threads, out.shape[0] * (thread + 1) // threads)
                if i == 0 and scale is not None:
                    np.multiply(source[part], source.dtype.type(scale), out=out[part])
                else:
                    np.copyto(out[part], source[part])

        run_parallel(fill, list(range(threads)))
        for i, out in jobs:
            results[i] = out.reshape(math.prod(out.shape[:-2]), *out.shape[-2:])
    return results


# What backward works from: the CPU keeps P (one (N, Tq, Tk) array per call), because
# recomputing it would add a matrix product to an op bound by its matrix products; a GPU
# recomputes P from Q and K in backward (one GEMM + one kernel: ~3% of a GPT-2-small step)
# rather than keeping 400 MB per layer alive between the forward and the backward pass.
RECOMPUTE_PROBS = {"cpu": False, "cuda": True}


def _merge_groups(a):
    """(n, G, R, X) -> (n, G·R, X) as a view when the G and R axes merge without a copy, else None.

    They merge when G = 1, or when each group's rows follow the previous group's
    (stride of G = R · stride of R): a whole (…, G, Tq, ·) array or all query rows of a tile.
    """
    n, group, rows, cols = a.shape
    if group == 1 or a.strides[1] == rows * a.strides[2]:
        return a.reshape(n, group * rows, cols)
    return None


def _matmul_into_heads(a, b, out, b0: int, r0: int, r1: int) -> None:
    """out[bi, h, r0:r1] = a[i] @ b[i] for the matrices i of a tile, matrix b0 + i being head h
    of sequence bi; ``out`` (B, H, Tq, Dv) is a view of a (B, Tq, H, Dv) array.

    The CPU forward writes O in that memory order when its leading axes are (B, H), as
    the model's are: the model's transpose back to (B, Tq, H, Dv) and its reshape to
    (B, Tq, C) are then views, where they were a copy of O on one core. Each product
    lands in rows H·Dv apart, which the BLAS takes as its leading dimension; a tile's
    matrices are cut where a sequence ends (one product per sequence it covers).
    Measured in ``minillm bench train``'s step (3 alternating runs each, load 0.6–1.2):
    the copy's 3.2–3.4 ms gone, the attention forward 53.1 -> 54.9 ms (more, strided
    products), peak RSS 782 -> 764 MiB (the graph kept O and its copy until the backward).
    """
    heads = out.shape[1]
    i = 0
    while i < a.shape[0]:
        sequence, h0 = divmod(b0 + i, heads)
        h1 = min(heads, h0 + a.shape[0] - i)
        np.matmul(a[i:i + h1 - h0], b[i:i + h1 - h0], out=out[sequence, h0:h1, r0:r1])
        i += h1 - h0


def _grouped_matmul(a, b, out):
    """out[:, g] = a[:, g] @ b for every group g; b (n, X, Y) is shared by the G groups of a (n, G, R, X).

    This is how grouped-query attention uses one key/value head for G query heads
    without repeating it: when the group and row axes merge (always for G = 1, and
    for a tile of all query rows, as on a GPU) it is one batched GEMM
    (n, G·R, X) @ (n, X, Y); otherwise b is broadcast over the group axis, a
    stride-0 view that NumPy's matmul reads in place.
    """
    xp = array_module(a)
    a2, out2 = _merge_groups(a), _merge_groups(out)
    if a2 is not None and out2 is not None:
        _batched_matmul(a2, b, out2)
    else:
        xp.matmul(a, b[:, None], out=out)
    return out


def _group_summed_matmul(a, b, out=None, accumulate: bool = False):
    """Σ_g a[:, g]ᵀ @ b[:, g] for a (n, G, R, X), b (n, G, R, Y) -> (n, X, Y) (into ``out`` if given,
    added to it with ``accumulate``).

    The gradient of a key/value head shared by G query heads is the sum of the G
    heads' contributions. With merged (G·R) rows the sum is the GEMM's own inner
    sum; otherwise the G products are formed and summed over the group axis.
    """
    xp = array_module(a)
    a2, b2 = _merge_groups(a), _merge_groups(b)
    if a2 is not None and b2 is not None:
        if out is None:
            return xp.matmul(a2.swapaxes(-1, -2), b2)
        return _batched_matmul(a2.swapaxes(-1, -2), b2, out, accumulate)
    if accumulate:
        out += xp.matmul(a.swapaxes(-1, -2), b).sum(axis=1)
        return out
    return xp.matmul(a.swapaxes(-1, -2), b).sum(axis=1, out=out)


def _summed_product(a, b, dest, in_place: bool) -> None:
    """dest = Σ_g a[:, g]ᵀ b[:, g] when ``in_place``, else dest += it (a tile's share of dK or dV;
    on the CPU the BLAS adds it in, beta = 1)."""
    _group_summed_matmul(a, b, out=dest, accumulate=not in_place)


def _batched_matmul(a, b, out, accumulate: bool = False):
    """out (+)= a @ b for stacks of matrices (n, ·, ·): on the CPU ``cpu_gemm_batched`` (one MKL
    call per tile when MKL is installed, else ``np.matmul``), on a GPU ``cupy.matmul``."""
    if isinstance(a, np.ndarray):
        return cpu_gemm_batched(a, b, out, accumulate)
    xp = array_module(a)
    if accumulate:
        out += xp.matmul(a, b)
        return out
    return xp.matmul(a, b, out=out)


# Which GPU implementation runs (minillm/kernels/attention.py): "flash" (fused kernels, O(T)
# memory: on the tensor cores for bf16/fp16 with head size 32 or 64, else fp32 accumulation on
# the CUDA cores), "scores" (cuBLAS products around the materialised score matrix: tensor cores,
# TF32 and autocast, O(Tq·Tk) memory while it runs), or "auto": flash whenever the tensor-core
# kernels apply (they never write the score matrix, so they win at every size), otherwise once
# the score matrices would hold FLASH_MIN_SCORES elements or more.
# Dropout always takes "scores" (the flash kernels have no dropout).
GPU_ATTENTION = "auto"
FLASH_MIN_SCORES = 1 << 28


def _use_flash(q, k, v, n_scores: int, dropout_p: float) -> bool:
    if dropout_p > 0 or GPU_ATTENTION == "scores" or not kernels.flash_supported(q, k, v):
        return False
    if GPU_ATTENTION == "flash" or n_scores >= FLASH_MIN_SCORES:
        return True
    reduced = precision.autocast_dtype() or (q.dtype if q.dtype.name in ("bfloat16", "float16") else None)
    return kernels.flash_tc_eligible(q, k, v, reduced)


class ScaledDotProductAttention(Function):
    """O = dropout(softmax(mask(s · Q Kᵀ))) V, one fused op; the module docstring derives backward.

    The leading axes are flattened: K (N, Tk, D), V (N, Tk, Dv) with N key/value
    heads, and Q (N, G, Tq, D): the G query heads that share each key/value head
    (grouped-query attention; G = 1 is ordinary multi-head attention). Every
    product below pairs a (n, G, rows, ·) query-side block with one (n, ·, ·)
    key/value block (``_grouped_matmul``), and dK, dV sum over the group
    (``_group_summed_matmul``): repeated keys and values are never formed.
    """

    float_only = True     # integer or boolean inputs: TypeError in the user's words

    def __init__(self, causal: bool, dropout_p: float, scale: float, group: int = 1):
        self.causal, self.dropout_p, self.scale, self.group = causal, dropout_p, scale, group

    def forward(self, q, k, v):
        if backend.device_of(q) != "cpu":
            return self._forward_gpu(q, k, v)
        xp = array_module(q)
        lead, (tq, d), (tk, dv) = q.shape[:-2], q.shape[-2:], v.shape[-2:]
        # (N, G, Tq, D) with the scale in (the small operand), (N, Tk, D), (N, Tk, Dv): copies
        # where the heads are strided views (the model's q, k, v), made on both cores
        q4, k3, v3 = _cpu_operands((q, k, v), self.scale)
        n, group = k3.shape[0], self.group
        q4 = q4.reshape(n, group, tq, d)
        groups = _tile_groups(n, tq, tk, self.causal, backend.device_of(q), group=group)
        # P (N, G, Tq, Tk); entries right of a tile's k_end are never written nor read
        probs = xp.empty((n, group, tq, tk), dtype=q.dtype)
        heads_last = len(lead) == 2 and group == 1
        if heads_last:      # (B, H, Tq, Dv) held as (B, Tq, H, Dv): see _matmul_into_heads
            out = xp.empty((lead[0], tq, lead[1], dv), dtype=q.dtype).transpose(0, 2, 1, 3)
        else:
            out = xp.empty((n, group, tq, dv), dtype=q.dtype)                          # (N, G, Tq, Dv)
        keep = None
        if self.dropout_p > 0:
            keep = dropout_keep_mask(lead + (tq, tk), self.dropout_p, backend.device_of(q)).reshape(probs.shape)
        compiled = kernels.cpu_softmax_usable(probs)          # the C++ row kernel on the tiles (views of P)

        def forward_tiles(tiles):
            for b0, b1, r0, r1, k_end in tiles:
                p = probs[b0:b1, :, r0:r1, :k_end]           # a view: this tile's scores, then P
                _grouped_matmul(q4[b0:b1, :, r0:r1], k3[b0:b1, :k_end].swapaxes(-1, -2), out=p)
                _softmax_rows_(p, self.causal, compiled)      # in place
                if keep is not None:
                    p = p * keep[b0:b1, :, r0:r1, :k_end]     # P ⊙ M (the 1/(1 − p) comes below)
                if heads_last:
                    _matmul_into_heads(p[:, 0], v3[b0:b1, :k_end], out, b0, r0, r1)
                else:
                    _grouped_matmul(p, v3[b0:b1, :k_end], out=out[b0:b1, :, r0:r1])

        _run_tile_groups(forward_tiles, groups)
        if keep is not None:
            out *= out.dtype.type(1.0 / (1.0 - self.dropout_p))   # O = (P ⊙ M) V / (1 − p)
        recompute = RECOMPUTE_PROBS[backend.device_of(q).split(":")[0]]
        self.kv_shapes = k.shape, v.shape
        self.save(q4, k3, v3, None if recompute else probs, keep, groups)
        return out if heads_last else out.reshape(lead + (tq, dv))

    def backward(self, grad):                                   # grad = dO (…, Tq, Dv)
        # The CPU backward (the GPU's is _backward_gpu). dV = P̃ᵀ dO and dK = dSᵀ (s Q): NumPy
        # hands the transposed P̃ and dS to the BLAS as flags (no copy), and the (…, Tk, D)
        # results land in dK and dV directly (their transposed twins (dOᵀ P̃)ᵀ would need an
        # add through a transposed view: 0.40 against 0.28 ms per tile of 8 matrices).
        if self.on_gpu:
            return self._backward_gpu(grad)
        q4, k3, v3, probs, keep, groups = self.saved
        xp = array_module(grad)
        k_shape, v_shape = self.kv_shapes
        n, group, tq, _ = q4.shape
        (grad3,) = _cpu_operands((grad,))                       # contiguous (a copy if strided), on both cores
        grad4 = grad3.reshape(n, group, tq, grad.shape[-1])     # (N, G, Tq, Dv)
        keep_scale = grad.dtype.type(1.0 / (1.0 - self.dropout_p))
        q_scale = grad.dtype.type(self.scale)
        want_q, want_k, want_v = self.needs_input_grad
        tk = k3.shape[1]
        # gradients are allocated in their input's shape and filled through (N, ·, T, ·) views
        allocate = xp.empty if tq else xp.zeros                # no queries: no tile writes dK, dV
        grad_q = xp.empty(grad.shape[:-1] + q4.shape[-1:], dtype=grad.dtype) if want_q else None
        grad_k = allocate(k_shape, dtype=grad.dtype) if want_k else None
        grad_v = allocate(v_shape, dtype=grad.dtype) if want_v else None
        grad_q4 = None if grad_q is None else grad_q.reshape(q4.shape)
        grad_k3, grad_v3 = (None if g is None else g.reshape(n, *g.shape[-2:]) for g in (grad_k, grad_v))
        summed = [a for a in (grad_k3, grad_v3) if a is not None]
        # the C++ row kernels on the tiles (views of P; dP̃ / dS buffers of P's dtype)
        compiled = kernels.cpu_softmax_usable(probs if probs is not None else q4)

        def backward_tiles(tiles):
            # dK and dV are sums over a matrix's tiles. The tiles that see every key run first
            # and write their products in place; later tiles add theirs. A matrix whose first
            # tile sees fewer keys (not the case with the default tiles) is zeroed first.
            written = set()                                         # matrices of dK, dV holding a product
            for b0, b1, r0, r1, k_end in sorted(tiles, key=lambda tile: -tile[4]):
                fresh = [b for b in range(b0, b1) if b not in written]
                in_place = k_end == tk and len(fresh) == b1 - b0
                if not in_place:
                    for b in fresh:
                        for a in summed:
                            a[b] = 0
                written.update(fresh)
                q_tile = q4[b0:b1, :, r0:r1]                        # (n, G, rows, D)
                if probs is None:                                   # recompute P, as in forward
                    p = xp.empty(q_tile.shape[:-1] + (k_end,), dtype=q4.dtype)
                    _grouped_matmul(q_tile, k3[b0:b1, :k_end].swapaxes(-1, -2), out=p)
                    _softmax_rows_(p, self.causal, compiled)
                else:
                    p = probs[b0:b1, :, r0:r1, :k_end]              # (n, G, rows, k_end)
                tile_keep = None if keep is None else keep[b0:b1, :, r0:r1, :k_end]
                g = grad4[b0:b1, :, r0:r1]                          # (n, G, rows, Dv)
                if want_v:
                    kept = p if keep is None else p * tile_keep     # P ⊙ M; P̃ = that / (1 − p)
                    _summed_product(kept, g, grad_v3[b0:b1, :k_end], in_place)   # Σ_g P̃ᵀ dO (n, k_end, Dv)
                if want_q or want_k:
                    grad_scores = xp.empty(p.shape, dtype=p.dtype)
                    _grouped_matmul(g, v3[b0:b1, :k_end].swapaxes(-1, -2), out=grad_scores)  # dP̃ = dO Vᵀ
                    _softmax_rows_backward_(grad_scores, p, self.causal, tile_keep, keep_scale, compiled)  # dS
                    if want_q:
                        grad_q_tile = grad_q4[b0:b1, :, r0:r1]
                        _grouped_matmul(grad_scores, k3[b0:b1, :k_end], out=grad_q_tile)  # dS K
                        grad_q_tile *= q_scale                                          # dQ = s · dS K
                    if want_k:
                        _summed_product(grad_scores, q_tile, grad_k3[b0:b1, :k_end], in_place)  # Σ_g dSᵀ (s Q)

        _run_tile_groups(backward_tiles, groups)
        if want_v and keep is not None:
            grad_v *= keep_scale
        return grad_q, grad_k, grad_v

    on_gpu = False

    def _forward_gpu(self, q, k, v):
        """On a GPU: the flash kernels or the score-matrix path (``GPU_ATTENTION``), both in
        minillm/kernels/attention.py, accumulating and returning float32.

        Under autocast the flash kernels read bf16/fp16 copies of q, k, v (saved for
        backward: half the bytes). The score-matrix path instead keeps float32 operands and
        multiplies on TF32 tensor cores (10 mantissa bits, fp16's): there the casts of q, k,
        v, P, dO and dS to 16 bits cost more memory passes than the products gain (measured
        on an H200, gpt2-124m B=8 T=1024: attention 36 ms per step with bf16 operands, 23 ms
        in TF32). The precision chosen in forward is kept for backward.

        Saved for backward: q, k, v as they came (usually strided views of the model's
        qkv projection, which the graph keeps alive anyway), not the contiguous copies
        the products read: those are made again in backward (three (B, T, C) float32 arrays
        per layer not kept: 0.9 GB for GPT-2 small at B=8, T=1024)."""
        self.on_gpu = True
        lead, (tq, d), (tk, dv) = q.shape[:-2], q.shape[-2:], v.shape[-2:]
        self.dtypes = q.dtype, k.dtype, v.dtype
        self.kv_shapes = k.shape, v.shape
        n, group = int(np.prod(k.shape[:-2])), self.group
        self.flash = _use_flash(q, k, v, n * group * tq * tk, self.dropout_p)
        self.tf32 = precision.tf32_enabled() or (precision.autocast_dtype() is not None and not self.flash)
        if self.flash:
            q, k, v = precision.autocast_operands(q, k, v)
        q4, k3, v3 = self._operands(q, k, v)
        if self.flash:
            out, lse = kernels.flash_attention_forward(q4.reshape(n * group, tq, d), k3, v3, self.causal, self.scale)
            self.save(q, k, v, out, lse, None)
        else:
            keep = None
            if self.dropout_p > 0:
                keep = dropout_keep_mask(lead + (tq, tk), self.dropout_p, backend.device_of(q)).reshape(n, group, tq, tk)
            out, probs = kernels.scores_attention_forward(q4, k3, v3, self.causal, self.scale, keep,
                                                          1.0 / (1.0 - self.dropout_p), self.tf32)
            recompute = RECOMPUTE_PROBS["cuda"]
            self.save(q, k, v, None, None if recompute else probs[0] if len(probs) == 1 else probs, keep)
        return out.reshape(lead + (tq, dv)).astype(self.dtypes[0], copy=False)

    def _operands(self, q, k, v):
        """q (N, G, Tq, D), k (N, Tk, D), v (N, Tk, Dv) for the kernels (copies where q, k, v are strided)."""
        n, tq, tk = int(np.prod(k.shape[:-2])), q.shape[-2], k.shape[-2]
        return (q.reshape(n, self.group, tq, q.shape[-1]), k.reshape(n, tk, k.shape[-1]),
                v.reshape(n, tk, v.shape[-1]))

    def _backward_gpu(self, grad):
        q, k, v, out, saved, keep = self.saved
        q4, k3, v3 = self._operands(q, k, v)
        n, group, tq, d = q4.shape
        k_shape, v_shape = self.kv_shapes
        grad4 = grad.reshape(n, group, tq, grad.shape[-1])
        if self.flash:
            grad_q, grad_k, grad_v = kernels.flash_attention_backward(
                q4.reshape(n * group, tq, d), k3, v3, out, saved, grad4.reshape(n * group, tq, -1),
                self.causal, self.scale)
        else:
            grad_q, grad_k, grad_v = kernels.scores_attention_backward(
                grad4, q4, k3, v3, saved, self.causal, self.scale, keep, 1.0 / (1.0 - self.dropout_p),
                self.tf32)
        want_q, want_k, want_v = self.needs_input_grad
        dtype_q, dtype_k, dtype_v = self.dtypes
        return (grad_q.reshape(grad.shape[:-1] + (d,)).astype(dtype_q, copy=False) if want_q else None,
                grad_k.reshape(k_shape).astype(dtype_k, copy=False) if want_k else None,
                grad_v.reshape(v_shape).astype(dtype_v, copy=False) if want_v else None)


def _check_attention_args(q, k, v, causal, dropout_p, scale, op_name):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op_name}: {name} must be a Tensor")
        if t.ndim < 2:
            raise ValueError(f"{op_name}: {name} needs at least 2 dims (…, T, D), got shape {t.shape}")
    if k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"{op_name}: k and v must share their leading dims, got {k.shape} and {v.shape}")
    group = 1
    if q.shape[:-2] != k.shape[:-2]:   # grouped-query attention: (…, Hq, T, D) queries, (…, Hkv, T, D) keys
        if q.ndim < 3 or q.ndim != k.ndim or q.shape[:-3] != k.shape[:-3] or q.shape[-3] % max(k.shape[-3], 1):
            raise ValueError(
                f"{op_name}: q, k, v must share their leading dims, or differ only in the head axis "
                f"(-3) with the key/value heads dividing the query heads (grouped-query attention); "
                f"got {q.shape}, {k.shape}, {v.shape}"
            )
        group = q.shape[-3] // k.shape[-3]
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op_name}: q and k need the same last dim, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op_name}: k and v need the same length, got {k.shape[-2]} and {v.shape[-2]}")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(
            f"{op_name}: causal attention with more queries ({q.shape[-2]}) than keys ({k.shape[-2]}): "
            f"the queries are the last positions, so the first ones would see no key"
        )
    dropout_p = _check_p(dropout_p, op_name)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return dropout_p, scale, group


def scaled_dot_product_attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale=None) -> Tensor:
    """softmax(mask(Q Kᵀ · scale)) V on (…, T, D) tensors, usually (B, H, T, Dh); fused forward and backward.

    ``causal``: query i attends keys j <= i + (Tk − Tq), i.e. the queries are the
    last Tq positions (Tq < Tk when decoding with a KV cache). ``dropout_p`` is
    applied to the attention probabilities (pass 0 in eval mode). ``scale``
    defaults to 1/√D.

    Grouped-query attention: k and v may have fewer heads than q, q (…, Hq, Tq, D)
    with k, v (…, Hkv, Tk, ·) and Hkv dividing Hq; query heads h·G … h·G + G − 1
    (G = Hq / Hkv) all use key/value head h. The keys and values are not repeated.
    """
    dropout_p, scale, group = _check_attention_args(q, k, v, causal, dropout_p, scale,
                                                     "scaled_dot_product_attention")
    return ScaledDotProductAttention.apply(q, k, v, causal=bool(causal), dropout_p=dropout_p, scale=scale,
                                           group=group)


def scaled_dot_product_attention_composed(q, k, v, causal: bool = True, dropout_p: float = 0.0, scale=None) -> Tensor:
    """The same attention, composed from primitive ops (for reading; its gradient comes from them).

    Grouped-query attention is a broadcast: q becomes (…, Hkv, G, Tq, D) and k, v
    (…, Hkv, 1, Tk, ·), so matmul pairs every query head of a group with its
    key/value head, and matmul's backward sums the group's gradients back into it.
    """
    dropout_p, scale, group = _check_attention_args(
        q, k, v, causal, dropout_p, scale, "scaled_dot_product_attention_composed"
    )
    out_shape = q.shape[:-1] + v.shape[-1:]
    if group > 1:
        q = reshape(q, k.shape[:-2] + (group,) + q.shape[-2:])         # (…, Hkv, G, Tq, D)
        k = reshape(k, k.shape[:-2] + (1,) + k.shape[-2:])             # (…, Hkv, 1, Tk, D)
        v = reshape(v, v.shape[:-2] + (1,) + v.shape[-2:])             # (…, Hkv, 1, Tk, Dv)
    axes = list(range(k.ndim))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    scores = matmul(q, transpose(k, *axes)) * scale                   # (…, Tq, Tk)
    if causal:
        future = causal_mask(q.shape[-2], k.shape[-2], q.device)      # (Tq, Tk), broadcast
        scores = where(future, -np.inf, scores)
    probs = softmax_composed(scores, axis=-1)
    probs = dropout(probs, dropout_p)                                 # the same mask as the fused op
    return reshape(matmul(probs, v), out_shape)                       # (…, Tq, Dv)
