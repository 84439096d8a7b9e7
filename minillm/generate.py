"""Generation: continue a prompt one token at a time, with a KV cache.

    out = generate(model, ids, max_new_tokens=50, temperature=0.8, top_k=50, seed=0)
    # ids (B, T) -> out (B, T + n), n <= max_new_tokens (fewer only when every row hit eos_id)

The loop (``use_cache=True``, the default):

    cache = model.new_kv_cache(B, T + max_new_tokens - 1)
    logits = model(prompt, cache=cache)[:, -1]       # prefill: all T prompt positions in ONE forward
    repeat:
        next = sample_next(logits, ...)              # (B,) ids
        logits = model(next[:, None], cache=cache)[:, -1]   # one new position per step

Each step runs the model on ONE position; the keys and values of the earlier
positions come from the cache, so a step costs O(context) for attention plus the
fixed O(parameters) of the matmuls, instead of rerunning all T + t positions
(``use_cache=False``, kept as the reference: it must give the same logits).
docs/generation.md has the details.

Sampling (``sample_next``) turns the last position's logits (B, V) into one id per row:

- ``temperature == 0``: greedy, the argmax.
- otherwise p = softmax(logits / temperature); lower temperature sharpens p.
- ``top_k``: keep the k most likely tokens (exactly k; among ties the lowest ids), zero the rest.
- ``top_p`` (nucleus): keep the smallest set of most likely tokens whose mass
  reaches p (always at least one), zero the rest; then renormalise.
- draw u ~ U[0, 1) and take the first token whose cumulative probability exceeds
  u (inverse-CDF sampling).

Reproducibility on every device: the random numbers come from a NumPy
``Generator`` on the CPU, seeded by ``seed`` (one draw per row per step), and
the filtering and inverse CDF run on the host in float64 on the (B, V) logits
copied there. GPU and CPU random streams differ (CuPy's generators are not
NumPy's), and a float32 cumulative sum on the GPU rounds differently from
NumPy's; doing this small step on the host makes the tokens a pure function of
(logits, seed): identical logits give identical tokens on the CPU and on any
GPU. The copy is B·V floats per step (0.2 MB for GPT-2 at B = 1), negligible
beside the forward. Greedy decoding takes the argmax where the logits live.

Past the context window. A model sees at most ``context_length`` (C) tokens,
so a sequence that outgrows it is continued from a window of its latest
tokens. Rule (``window_start``): the window [s, n) that predicts token n starts
at s = 0 and stays put while n - s <= C; when it would hold C + 1 tokens, it
jumps forward to keep only the last ``keep`` tokens, s = n - keep, and grows
again. ``keep`` defaults to 3C/4 (``window_keep``), so the model always sees
at least 3/4 of a full context; ``keep = C`` is "the last C tokens at every
step" (nanoGPT's crop). With the cache, a jump clears the cache and re-prefills
it with the kept tokens: their positions restart at 0, exactly as when the
window is recomputed from scratch (learned position embeddings make the
positions part of every cached key and value, so the cache cannot simply be
shifted). A jump costs one prefill of ``keep`` tokens every ``C - keep + 1`` new
tokens. ``use_cache=False`` recomputes the same windows from scratch, and the
two give the same tokens. A prompt longer than C starts from its last C tokens.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from . import backend
from .backend import array_module
from .tensor import Tensor, no_grad
from .checks import is_integer, is_real


# ------------------------------------------------------------------ sampling


def check_sampling_args(temperature, top_k, top_p) -> None:
    """Raise ValueError (naming the value) for a temperature < 0, top_k < 1 or top_p outside (0, 1]."""
    if not is_real(temperature) or not 0 <= temperature < np.inf:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sampling_probs(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """The distribution the next token is drawn from: (B, V) logits -> (B, V) float64 host probabilities.

    p = softmax(logits / temperature), restricted to the top_k most likely tokens
    and then to the nucleus of mass top_p, renormalised (rows sum to 1).

    >>> sampling_probs(np.log([[0.5, 0.3, 0.2]]), top_p=0.7).round(3).tolist()
    [[0.625, 0.375, 0.0]]
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("sampling_probs: temperature 0 is greedy decoding (argmax), not a distribution")
    scores = backend.to_numpy(_logits_array(logits, "sampling_probs")).astype(np.float64)   # (B, V), our copy
    vocab = scores.shape[-1]
    if top_k is not None and top_k < vocab:
        # exactly k survive: the scores above the k-th largest, then of those tied with it the lowest ids
        # (the order of a stable sort, and greedy's argmax: top_k=1 is greedy); O(V) per row
        kth = np.partition(scores, vocab - top_k, axis=-1)[:, vocab - top_k, None]   # (B, 1)
        dropped, tied = scores < kth, scores == kth
        room = top_k - (scores > kth).sum(axis=-1, keepdims=True)         # (B, 1) places left for the tied
        if (tied.sum(axis=-1, keepdims=True) > room).any():               # more tied than places (rare)
            dropped |= tied & (np.cumsum(tied, axis=-1) > room)
        scores[dropped] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)                      # the largest is 0: exp cannot overflow,
    with np.errstate(over="ignore"):
        scores /= temperature                                         # nor z / T for a tiny T (-> -inf, exp 0)
    probs = np.exp(scores, out=scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")            # most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[mass_before >= top_p] = 0.0                      # the nucleus already reached p without them
        np.put_along_axis(probs, order, sorted_probs, axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def inverse_cdf_sample(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """For each row, the first token whose cumulative probability exceeds u · (row total).

    A token of probability 0 is never chosen (its cumulative sum equals its
    predecessor's, so an earlier token always wins).

    >>> inverse_cdf_sample(np.array([[0.2, 0.0, 0.8]]), np.array([0.5])).tolist()
    [2]
    """
    cdf = np.cumsum(probs, axis=-1)                                   # (B, V), non-decreasing
    thresholds = uniforms * cdf[:, -1]                                # (B,), in [0, total)
    ids = (cdf <= thresholds[:, None]).sum(axis=-1)                   # = searchsorted(cdf, u, "right")
    last_possible = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(ids, last_possible).astype(np.int64)            # guard against u·total rounding to total


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """One token per row from (B, V) logits (NumPy, CuPy or a Tensor) -> (B,) int64 NumPy ids.

    ``temperature == 0`` is greedy (argmax, no random draw). Otherwise exactly one
    uniform is drawn from ``rng`` per row, on the CPU; see the module docstring
    for why this makes the tokens identical on every device.
    """
    check_sampling_args(temperature, top_k, top_p)
    logits = _logits_array(logits, "sample_next")
    if temperature == 0:
        xp = array_module(logits)
        return backend.to_numpy(xp.argmax(logits, axis=-1)).astype(np.int64)
    if rng is None:
        rng = _default_rng()
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return inverse_cdf_sample(probs, rng.random(probs.shape[0]))


def _logits_array(logits, caller: str):
    """The (B, V) array of ``logits`` (an array, or a Tensor such as ``model(ids)[:, -1]``)."""
    if isinstance(logits, Tensor):
        logits = logits.data
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"{caller}: expected logits of shape (batch, vocab), got {np.shape(logits)}")
    return logits


def _default_rng(seed=None) -> np.random.Generator:
    """A Generator from ``seed``; with None, seeded from minillm's CPU stream (so mm.manual_seed governs it)."""
    if seed is None:
        seed = int(backend.cpu_generator().integers(2**63))
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ the loop


def _prompt_array(ids, vocab_size: int) -> tuple[np.ndarray, bool]:
    """``ids`` (list, array or Tensor; (T,) or (B, T)) -> int64 host array (B, T), and whether it was 1-D."""
    if isinstance(ids, Tensor):
        ids = ids.data
    try:
        ids = backend.to_numpy(ids) if hasattr(ids, "dtype") else np.asarray(ids)
    except ValueError:                                                # NumPy: "inhomogeneous shape"
        raise ValueError("generate: the prompt must be a (T,) or (batch, T) array of ids; "
                         "rows of a batch must have equal length") from None
    squeeze = ids.ndim == 1
    if squeeze:
        ids = ids[None]
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"generate: the prompt must be a non-empty (T,) or (batch, T) array of ids, "
                         f"got shape {tuple(ids.shape)} (rows of a batch must have equal length)")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"generate: token ids must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"generate: token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    return ids.astype(np.int64), squeeze


def default_window_keep(context_length: int) -> int:
    """Tokens kept when the window slides (see the module docstring): 3/4 of the context, at least 1."""
    return max(1, context_length - context_length // 4)


def window_start(start: int, length: int, context_length: int, keep: int) -> int:
    """Where the window that predicts token ``length`` starts, given that the previous one started at
    ``start``: unchanged while it holds at most ``context_length`` tokens, else the last ``keep``."""
    return start if length - start <= context_length else length - keep


def generate(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
             use_cache: bool = True, stream=None, window_keep: int | None = None,
             cuda_graph: bool | None = None) -> np.ndarray:
    """Continue ``ids`` by up to ``max_new_tokens`` sampled tokens; returns the ids, prompt included.

    ``ids``: (T,) or (B, T) integer ids (rows of a batch have equal length).
    Returns an int64 NumPy array of the same rank, (B, T + n). ``n ==
    max_new_tokens`` unless ``eos_id`` is given and every row produced it: a row
    that emits ``eos_id`` stops (its later columns are ``eos_id``), and the loop
    ends when all rows have stopped.

    ``temperature`` 0 is greedy; ``top_k``/``top_p`` filter the distribution;
    ``seed`` makes sampling reproducible (on any device: see the module
    docstring; None draws a seed from minillm's CPU stream, set by
    ``mm.manual_seed``). ``use_cache=False`` reruns the whole window every step
    (the slow reference). ``stream(column)`` is called with each new (B,) column
    of ids as soon as it is sampled. The model runs in eval mode under
    ``mm.no_grad()``; its previous mode is restored afterwards.

    There is no length limit: past ``context_length`` the window slides (module
    docstring), keeping the last ``window_keep`` tokens (default 3/4 of the
    context) at each jump.

    ``cuda_graph``: replay each one-token step as a captured CUDA graph (see
    "CUDA-graph decoding" below). None (default) does so on a GPU for the models
    it supports when ``CUDA_GRAPH_DECODING`` is on; True insists (ValueError where
    it cannot); False never.
    """
    config = model.config
    prompt, squeeze = _prompt_array(ids, config.vocab_size)
    check_sampling_args(temperature, top_k, top_p)
    if not is_integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if eos_id is not None and (not is_integer(eos_id)
                               or not 0 <= eos_id < config.vocab_size):
        raise ValueError(f"generate: eos_id must be a token id in [0, {config.vocab_size}), got {eos_id!r}")
    if seed is not None and (not is_integer(seed) or seed < 0):
        raise ValueError(f"generate: seed must be an integer >= 0 or None, got {seed!r}")
    if stream is not None and not callable(stream):
        raise TypeError(f"generate: stream must be a function taking each new (B,) column of ids, got {stream!r}")
    context = config.context_length
    keep = default_window_keep(context) if window_keep is None else window_keep
    if not is_integer(keep) or not 1 <= keep <= context:
        raise ValueError(f"generate: window_keep must be an integer in [1, context_length={context}], got {keep!r}")
    batch, prompt_len = prompt.shape
    on_gpu = backend.device_of(model.wte.weight.data) != "cpu"
    if cuda_graph and not (use_cache and on_gpu and graph_decoding_supported(model)):
        raise ValueError("generate: cuda_graph=True needs use_cache, a GPU and a GPT-2-style model "
                         "(learned positions, LayerNorm, GELU, as many key/value heads as query heads)")
    wanted = CUDA_GRAPH_DECODING if cuda_graph is None else cuda_graph
    use_graph = wanted and use_cache and on_gpu and graph_decoding_supported(model)
    total = prompt_len + int(max_new_tokens)
    out = np.empty((batch, total), dtype=np.int64)
    out[:, :prompt_len] = prompt
    length = prompt_len
    if max_new_tokens > 0:
        rng = _default_rng(seed) if temperature != 0 else None
        finished = np.zeros(batch, dtype=bool)
        modes = [(module, module.training) for module in model.modules()]   # restored exactly below
        model.eval()
        try:
            with no_grad():
                # the last new token is never fed back, so the cache needs at most total - 1 positions
                decoder = graph_decoder(model, batch) if use_graph else None
                cache = model.new_kv_cache(batch, min(total - 1, context)) if use_cache and not use_graph else None
                if decoder is not None:
                    cache = decoder.cache                                 # the graph's own static cache
                    cache.reset()
                start = max(0, prompt_len - context)                      # a long prompt: its last C tokens
                logits = model(out[:, start:length], cache=cache).data[:, -1]   # prefill: (B, V)
                while True:
                    next_ids = sample_next(logits, temperature, top_k, top_p, rng)   # (B,) on the host
                    if eos_id is not None:
                        next_ids[finished] = eos_id                           # stopped rows pad with eos
                        finished |= next_ids == eos_id
                    out[:, length] = next_ids
                    length += 1
                    if stream is not None:
                        stream(next_ids.copy())
                    if length == total or finished.all():
                        break
                    previous, start = start, window_start(start, length, context, keep)
                    if cache is None:
                        logits = model(out[:, start:length]).data[:, -1]             # the whole window again
                    elif start == previous and decoder is not None:
                        logits = decoder.step(next_ids, cache.pos)                   # one replay
                        cache.advance(1)
                    elif start == previous:
                        logits = model(next_ids[:, None], cache=cache).data[:, -1]   # one position
                    else:                                                            # the window slid:
                        cache.reset()                                                # re-prefill, positions 0..keep-1
                        logits = model(out[:, start:length], cache=cache).data[:, -1]
        finally:
            for module, training in modes:
                module.training = training
    result = out[:, :length]
    return result[0] if squeeze else result


# ------------------------------------------------------------------ CUDA-graph decoding
#
# On a GPU a one-token decode step of GPT-2 small is ~300 kernel launches of a few
# microseconds of work each: Python and the launches, not the GPU, set the pace.
# A CUDA graph records the step's launches once and replays them with one call.
# A replay repeats the recorded kernels with their recorded arguments and
# buffers, so what changes per token lives in device memory the kernels read:
# the token ids and the position (kernels/generate.py). The step is the model's
# own layers (ln_1, c_attn, c_proj, mlp, ln_f, the output head) around the three
# position-dependent kernels; its KV cache is a KVCache whose arrays the graph
# reads and writes in place, so a prefill through the model fills it too.


CUDA_GRAPH_DECODING = True   # generate()'s default on a GPU (cuda_graph=None)


def graph_decoding_supported(model) -> bool:
    """The captured step is written for GPT-2-style models: learned positions, LayerNorm, GELU MLP,
    n_kv_head == n_head, no q/k norm, head_dim · n_head == d_model, float32 weights."""
    cfg = model.config
    return (getattr(cfg, "positions", "learned") == "learned" and getattr(cfg, "norm", "layernorm") == "layernorm"
            and getattr(cfg, "mlp", "gelu") == "gelu" and getattr(cfg, "n_kv_head", None) in (None, cfg.n_head)
            and not getattr(cfg, "qk_norm", False) and getattr(cfg, "head_dim", None) in (None, cfg.d_model // cfg.n_head)
            and cfg.d_model % cfg.n_head == 0 and model.wte.weight.dtype == np.float32)


class CudaGraphDecoder:
    """One decode step of ``model`` for ``batch`` rows, captured as a CUDA graph over a static
    KV cache of ``context_length`` positions; ``step(ids, pos)`` replays it.

    Captured in the precision in force at construction (fp32, TF32 or autocast); the
    weights are read from the model's own arrays at every replay (an in-place optimizer
    update is seen; replaced arrays are detected by ``matches`` and need a new decoder).
    """

    def __init__(self, model, batch: int):
        import cupy  # noqa: PLC0415

        from . import precision  # noqa: PLC0415
        from .kernels.matmul import prepare_capture  # noqa: PLC0415

        cfg = model.config
        self.model, self.batch = model, batch     # dropped after capture (a weak reference stays)
        self.params = [p.data for p in model.parameters()]
        self.mode = (precision.autocast_dtype(), precision.tf32_enabled())
        self.cache = model.new_kv_cache(batch, cfg.context_length)
        self.ids = cupy.zeros(batch, dtype=cupy.int64)                      # the step's inputs, in place
        self.pos = cupy.zeros(1, dtype=cupy.int32)
        heads = cfg.n_head
        self.scratch = cupy.empty((batch * heads, cfg.context_length), dtype=cupy.float32)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        pool = cupy.get_default_memory_pool()
        relaxed = getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", 2)   # the pool may cudaMalloc
        # the buffers above were zeroed on the caller's stream; this non-blocking stream must not
        # read them (pos, ids: an index into the cache and the embedding) before that has run
        self.stream.wait_event(cupy.cuda.get_current_stream().record())
        with self.stream, no_grad():
            self._step()                          # eager once: compiles the kernels, sizes the pool
            self.stream.synchronize()
            prepare_capture()                     # cuBLAS: this stream and a fixed workspace
            self.buffers = []                     # every block the graph touches, kept for its lifetime

            def keep_alive(size):
                memory = pool.malloc(size)
                self.buffers.append(memory)
                return memory

            cupy.cuda.set_allocator(keep_alive)
            try:
                self.stream.begin_capture(relaxed)
                try:
                    self.logits = self._step()    # (B, V), a buffer of the graph
                finally:
                    self.graph = self.stream.end_capture()
            finally:
                cupy.cuda.set_allocator(pool.malloc)
        self.model_ref, self.model = weakref.ref(model), None   # the cache below must not keep the model alive

    def matches(self, model) -> bool:
        """Whether this decoder still reads ``model``'s current weight arrays in the current precision."""
        from . import precision  # noqa: PLC0415

        return (model is self.model_ref() and self.mode == (precision.autocast_dtype(), precision.tf32_enabled())
                and len(self.params) == len(list(model.parameters()))
                and all(a is p.data for a, p in zip(self.params, model.parameters())))

    def _step(self):
        """The decode step on the static buffers: ids, pos -> logits (B, V); cache written at pos."""
        import cupy  # noqa: PLC0415

        from .functional import linear  # noqa: PLC0415
        from .kernels import generate as kernels  # noqa: PLC0415

        model, cfg, batch = self.model, self.model.config, self.batch
        C = cfg.d_model
        x = cupy.empty((batch, C), dtype=cupy.float32)
        kernels.embed_at_position(self.ids, model.wte.weight.data, model.wpe.weight.data, self.pos, x)
        x = Tensor(x[:, None])                                                  # (B, 1, C)
        scale = 1.0 / math.sqrt(C // cfg.n_head)
        for index, block in enumerate(model.h):                                 # TransformerBlock.forward, T = 1
            qkv = block.attn.c_attn(block.ln_1(x)).data.reshape(batch, 3 * C)   # (B, 3C)
            keys, values = self.cache.keys[index], self.cache.values[index]
            kernels.kv_cache_write(qkv, keys, values, self.pos)
            y = cupy.empty((batch, C), dtype=cupy.float32)
            kernels.decode_attention(qkv, keys, values, self.pos, self.scratch, y, scale)
            x = x + block.attn.c_proj(Tensor(y[:, None]))
            x = x + block.mlp(block.ln_2(x))
        return linear(model.ln_f(x), model.output_weight).data[:, 0]           # (B, V)

    def step(self, ids, pos: int):
        """Logits (B, V) for the tokens ``ids`` (B,) at position ``pos``, their k, v cached at pos."""
        import cupy  # noqa: PLC0415

        caller = cupy.cuda.get_current_stream()
        self.stream.wait_event(caller.record())                 # the prefill's cache writes come first
        with self.stream:
            self.ids[...] = cupy.asarray(ids, dtype=cupy.int64)
            self.pos.fill(pos)
            self.graph.launch(self.stream)
        caller.wait_event(self.stream.record())                 # the caller reads the logits after
        return self.logits


_graph_decoders: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> {batch: decoder}


def graph_decoder(model, batch: int) -> CudaGraphDecoder:
    """The captured decode step for (model, batch), captured on first use and reused while the
    model keeps its weight arrays and the precision is unchanged; forgotten with the model."""
    decoders = _graph_decoders.setdefault(model, {})
    decoder = decoders.get(batch)
    if decoder is None or not decoder.matches(model):
        decoders.pop(batch, None)
        decoder = decoders[batch] = CudaGraphDecoder(model, batch)
    return decoder
