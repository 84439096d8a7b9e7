"""generate() as a user calls it, against references written here from the documented rules.

The reference (``reference_generate``) never touches a KV cache nor minillm's samplers: at every step it
runs the model from scratch on the window the module docstring describes (start at 0, or at the last C
tokens of a long prompt; when the window would hold C + 1 tokens, keep the last ``window_keep``), and
draws the token with a plain-NumPy sampler (stable sort, top-k, softmax(z / T), nucleus, inverse CDF with
one uniform per row per step from ``np.random.default_rng(seed)``). GPT-2-style, Llama-style (rope with
Llama 3 scaling, GQA) and Qwen3-style (q/k norm, head_dim != d_model / n_head, untied head) tiny models.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm import backend
from minillm.generate import default_window_keep, generate, sample_next, sampling_probs
from minillm.models import GPT, GPTConfig

V, C = 23, 8      # vocabulary, context: a few dozen new tokens slide the window several times

CONFIGS = {
    "gpt2": dict(),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=2,
                  rope_theta=5e5, rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                                    high_freq_factor=2.0, original_max_position_embeddings=4)),
    "qwen3": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_head=4, n_kv_head=1,
                  head_dim=6, qk_norm=True, rope_theta=1e6, tie_embeddings=False),
}
_models = {}


def make_model(arch="gpt2", context_length=C):
    """A tiny model whose weights are large enough that its logits are far from uniform (no near-ties)."""
    key = (arch, context_length)
    if key not in _models:
        mm.manual_seed(0)
        model = GPT(GPTConfig(**{**dict(vocab_size=V, context_length=context_length, n_layer=2, n_head=2,
                                        d_model=16), **CONFIGS[arch]}))
        rng = np.random.default_rng(1)
        for param in model.parameters():
            param.data[...] = rng.standard_normal(param.shape).astype(np.float32) * 0.3
        _models[key] = model
    return _models[key].eval()


# ------------------------------------------------------------------ the independent reference


def reference_probs(logits_row, temperature, top_k=None, top_p=None):
    """One row's distribution from the definitions, in float64: the top_k largest logits (ties: the lower
    id first), softmax of them / T, then the shortest most-likely-first prefix whose mass reaches top_p."""
    row = np.asarray(logits_row, dtype=np.float64)
    order = np.argsort(-row, kind="stable")[:top_k]                  # most likely first
    z = row[order] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None:
        mass_before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        p = p[mass_before < top_p]
        order = order[:p.size]
        p /= p.sum()
    probs = np.zeros(row.size)
    probs[order] = p
    return probs


def reference_sample(logits, temperature, top_k, top_p, rng):
    """(B, V) -> (B,): greedy = the first largest logit; otherwise one uniform u per row, and the first
    token (in id order) whose cumulative probability exceeds u."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    uniforms = rng.random(len(logits))
    ids = []
    for row, u in zip(logits, uniforms):
        probs = reference_probs(row, temperature, top_k, top_p)
        cdf = np.cumsum(probs)
        ids.append(min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), int(np.flatnonzero(probs)[-1])))
    return np.array(ids)


def reference_generate(model, prompt, new_tokens, keep=None, temperature=1.0, top_k=None, top_p=None,
                       eos_id=None, seed=None):
    """The loop from its description, recomputing the whole window from scratch at every step."""
    context = model.config.context_length
    keep = default_window_keep(context) if keep is None else keep
    rows = np.array(prompt, dtype=np.int64).tolist()
    rng = np.random.default_rng(seed) if temperature else None
    finished = [False] * len(rows)
    start = max(0, len(rows[0]) - context)
    for _ in range(new_tokens):
        n = len(rows[0])
        if n - start > context:
            start = n - keep
        with mm.no_grad():
            logits = model(np.array([row[start:n] for row in rows])).numpy()[:, -1]
        next_ids = reference_sample(logits, temperature, top_k, top_p, rng)
        for b, row in enumerate(rows):
            row.append(eos_id if finished[b] else int(next_ids[b]))
            finished[b] = finished[b] or (eos_id is not None and row[-1] == eos_id)
        if all(finished):
            break
    return np.array(rows, dtype=np.int64)


SAMPLINGS = {
    "greedy": dict(temperature=0.0),
    "T=1": dict(temperature=1.0, seed=7),
    "T=0.7,k=5,p=0.9": dict(temperature=0.7, top_k=5, top_p=0.9, seed=3),
    "T=1.6,p=0.6": dict(temperature=1.6, top_p=0.6, seed=11),
}


def check_against_reference(model, prompt, new_tokens, keep=None, **sampling):
    expected = reference_generate(model, prompt, new_tokens, keep, **sampling)
    for use_cache in (True, False):
        out = generate(model, prompt, new_tokens, use_cache=use_cache, window_keep=keep, **sampling)
        assert out.dtype == np.int64 and out.shape == expected.shape, (use_cache, out.shape, expected.shape)
        np.testing.assert_array_equal(out, expected, err_msg=f"use_cache={use_cache} {sampling}")
    return expected


# ------------------------------------------------------------------ cache == no cache == reference


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("prompt_len", [1, C, C + 1, 3 * C])          # short, exactly C, just past, far past
def test_batched_generation_matches_the_from_scratch_reference(arch, sampling, prompt_len):
    model = make_model(arch)
    prompt = np.random.default_rng(prompt_len).integers(0, V, (3, prompt_len))
    out = check_against_reference(model, prompt, 2 * C + 3, **SAMPLINGS[sampling])
    np.testing.assert_array_equal(out[:, :prompt_len], prompt)
    assert len(set(out[:, prompt_len:].ravel().tolist())) > 1          # not a constant


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("keep", [1, 2, C - 1, C])
def test_window_keep_edge_values(arch, keep):
    model = make_model(arch)
    prompt = np.random.default_rng(keep).integers(0, V, (2, 3))
    check_against_reference(model, prompt, 3 * C, keep, temperature=0.9, seed=keep)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_a_float64_model(arch):
    """The cache takes the model's dtype: float64 weights generate as the reference does."""
    model = make_model(arch).to("cpu", dtype=np.float64)
    try:
        assert model.new_kv_cache(1).keys[0].dtype == np.float64
        prompt = np.array([[1, 2, 3], [4, 5, 6]])
        check_against_reference(model, prompt, 2 * C, temperature=0)
        check_against_reference(model, prompt, 2 * C, temperature=1.2, top_p=0.9, seed=8)
    finally:
        model.to("cpu", dtype=np.float32)


def test_a_context_of_one_token():
    """C = 1: every window is the last token alone (keep = 1), re-prefilled at every step."""
    model = make_model("llama", context_length=1)
    prompt = np.array([[3, 4, 5], [6, 7, 8]])
    check_against_reference(model, prompt, 10, temperature=0)
    check_against_reference(model, prompt, 10, temperature=1.0, seed=2)
    with mm.no_grad():                             # the reference itself: token t+1 is a function of token t
        first = model(prompt[:, -1:]).numpy()[:, -1].argmax(-1)
    np.testing.assert_array_equal(generate(model, prompt, 1, temperature=0)[:, -1], first)


@settings(max_examples=40, deadline=None)
@given(arch=st.sampled_from(list(CONFIGS)), context=st.sampled_from([1, 3, C]), batch=st.integers(1, 3),
       prompt_len=st.integers(1, 2 * C + 2), new_tokens=st.integers(0, 2 * C + 3), data=st.data(),
       sampling=st.sampled_from(list(SAMPLINGS)), eos=st.one_of(st.none(), st.integers(0, V - 1)),
       data_seed=st.integers(0, 2**16))
def test_random_shapes_match_the_reference(arch, context, batch, prompt_len, new_tokens, data, sampling, eos,
                                           data_seed):
    model = make_model(arch, context_length=context)
    keep = data.draw(st.one_of(st.none(), st.integers(1, context)), label="window_keep")
    prompt = np.random.default_rng(data_seed).integers(0, V, (batch, prompt_len))
    out = check_against_reference(model, prompt, new_tokens, keep, eos_id=eos, **SAMPLINGS[sampling])
    if eos is None or new_tokens == 0 or not (out[:, -1] == eos).all():
        assert out.shape == (batch, prompt_len + new_tokens)
    else:                                                 # it ended early only because every row stopped
        assert all(eos in row[prompt_len:] for row in out)


def test_prompt_forms_and_the_model_method():
    """(T,) gives (T + n,); a list, an int32 array, a Tensor and model.generate give the same; the caller's
    array is neither changed nor shared; no gradient is accumulated."""
    model = make_model("qwen3")
    out = generate(model, [5, 6, 7], 12, temperature=0.8, seed=4)
    assert out.shape == (15,) and out.dtype == np.int64
    np.testing.assert_array_equal(out, reference_generate(model, [[5, 6, 7]], 12, temperature=0.8, seed=4)[0])
    prompt = np.array([[5, 6, 7]], dtype=np.int32)
    for ids in (prompt, mm.Tensor(prompt), [[5, 6, 7]]):
        np.testing.assert_array_equal(generate(model, ids, 12, temperature=0.8, seed=4)[0], out)
    np.testing.assert_array_equal(model.generate(prompt, 12, temperature=0.8, seed=4)[0], out)
    result = generate(model, prompt, 0)
    assert not np.shares_memory(result, prompt) and result.dtype == np.int64
    result[:] = 0
    np.testing.assert_array_equal(prompt, [[5, 6, 7]])
    assert all(param.grad is None for param in model.parameters())


# ------------------------------------------------------------------ the models' KV cache


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(list(CONFIGS)), batch=st.integers(1, 3),
       cuts=st.lists(st.integers(1, C - 1), max_size=4, unique=True), data_seed=st.integers(0, 2**16))
def test_cached_chunks_equal_the_full_pass_and_a_reset_starts_over(arch, batch, cuts, data_seed):
    """Any split of C positions into a prefill and chunks (rope offsets from cache.pos, GQA's fewer cached
    heads, q/k norm) gives the full pass's logits; after reset() a new sequence starts at position 0."""
    model = make_model(arch)
    rng = np.random.default_rng(data_seed)
    first, second = rng.integers(0, V, (batch, C)), rng.integers(0, V, (batch, C))
    bounds = [0, *sorted(cuts), C]
    cache = model.new_kv_cache(batch)
    assert cache.keys[0].shape == (batch, model.config.n_kv_head, C, model.config.head_dim)
    with mm.no_grad():
        for ids in (first, second):
            cache.reset()
            chunks = [model(ids[:, a:b], cache=cache).numpy() for a, b in zip(bounds, bounds[1:])]
            assert cache.pos == C
            np.testing.assert_allclose(np.concatenate(chunks, axis=1), model(ids).numpy(), rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------ samplers: equivalences


def tied_logits():
    """Rows whose largest logit is shared by several ids (the argmax is the first of them)."""
    rows = np.array([[0.0] * V, [1.0, 3.0, 2.0, 3.0, 3.0] + [0.0] * (V - 5),
                     [-1.0] * (V - 3) + [2.0, 0.5, 2.0]])
    return np.concatenate([rows, np.tile([0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0], (1, 10))[:, :V]])


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_top_k_one_and_tiny_top_p_are_greedy(arch):
    model = make_model(arch)
    prompt = np.random.default_rng(5).integers(0, V, (3, 4))
    greedy = generate(model, prompt, 2 * C, temperature=0)
    for kwargs in (dict(top_k=1), dict(top_p=1e-12), dict(top_k=1, top_p=0.5), dict(top_p=1e-12, temperature=5.0)):
        for seed in (0, 1):
            np.testing.assert_array_equal(generate(model, prompt, 2 * C, seed=seed, **kwargs), greedy,
                                          err_msg=str(kwargs))


def test_top_k_one_and_tiny_top_p_are_greedy_among_ties():
    """Ties for the largest logit: the one kept is the argmax's (the lowest id), as greedy decoding takes."""
    logits = tied_logits()
    greedy = sample_next(logits, temperature=0)
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    for kwargs in (dict(top_k=1), dict(top_p=1e-12), dict(top_k=1, temperature=0.3)):
        np.testing.assert_array_equal(sample_next(logits, rng=np.random.default_rng(0), **kwargs), greedy,
                                      err_msg=str(kwargs))
        np.testing.assert_array_equal(sampling_probs(logits, **kwargs), np.eye(V)[greedy], err_msg=str(kwargs))


def test_top_k_among_ties_keeps_the_lowest_ids():
    """Exactly k survive; of the ids tied at the k-th largest logit, the lowest (as a stable sort ranks them)."""
    logits = tied_logits()
    for k in (1, 2, 3, 4, 7, V - 1):
        expected = np.array([reference_probs(row, 1.0, top_k=k) for row in logits])
        np.testing.assert_allclose(sampling_probs(logits, top_k=k), expected, rtol=1e-12, atol=0, err_msg=f"k={k}")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_top_k_at_least_the_vocabulary_is_no_top_k(arch):
    model = make_model(arch)
    prompt = np.random.default_rng(6).integers(0, V, (2, 3))
    logits = np.random.default_rng(7).standard_normal((4, V))
    unfiltered = sampling_probs(logits, temperature=1.3)
    for k in (V, V + 1, 10 * V):
        np.testing.assert_array_equal(sampling_probs(logits, temperature=1.3, top_k=k), unfiltered)
        for seed in (0, 1):
            np.testing.assert_array_equal(generate(model, prompt, 2 * C, temperature=1.3, top_k=k, seed=seed),
                                          generate(model, prompt, 2 * C, temperature=1.3, seed=seed))


def test_a_tiny_temperature_is_greedy():
    """tau -> 0 is greedy (docs/generation.md), down to the smallest positive float: z / tau overflowing to
    inf must not turn the distribution into NaN (which drew token 0)."""
    logits = np.random.default_rng(8).standard_normal((6, V)).astype(np.float32) * 4
    greedy = logits.argmax(-1)
    for temperature in (1e-3, 1e-30, 1e-300, 5e-324):
        probs = sampling_probs(logits, temperature=temperature)
        np.testing.assert_allclose(probs, np.eye(V)[greedy], rtol=0, atol=1e-6, err_msg=f"T={temperature}")
        np.testing.assert_array_equal(sample_next(logits, temperature, rng=np.random.default_rng(1)), greedy)
    np.testing.assert_array_equal(sample_next(logits, 1e-300, top_k=3, top_p=0.5, rng=np.random.default_rng(1)),
                                  greedy)


@settings(max_examples=60, deadline=None)
@given(logits=st.lists(st.lists(st.integers(-3, 3), min_size=7, max_size=7), min_size=1, max_size=4),
       temperature=st.sampled_from([0.25, 1.0, 3.0]), top_k=st.one_of(st.none(), st.integers(1, 9)),
       top_p=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_sampling_probs_match_the_reference_on_tied_logits(logits, temperature, top_k, top_p):
    """Integer logits in [-3, 3]: many ties, at the top-k boundary and inside the nucleus."""
    logits = np.array(logits, dtype=np.float64) / 2
    expected = np.array([reference_probs(row, temperature, top_k, top_p) for row in logits])
    probs = sampling_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(probs, expected, rtol=1e-12, atol=1e-15)
    if top_k is not None:
        assert ((probs > 0).sum(axis=-1) <= top_k).all()


def test_samplers_take_the_models_logits_tensor_and_refuse_other_shapes():
    """sample_next(model(ids)[:, -1]) works as on its array (was: SystemError / NumPy's 'setting an array
    element with a sequence'); one row of logits (V,) is refused in words by both paths (greedy returned a
    scalar, sampling raised)."""
    model = make_model("gpt2")
    with mm.no_grad():
        logits = model(np.array([[1, 2, 3], [4, 5, 6]]))[:, -1]             # Tensor (2, V)
    array = logits.numpy()
    for kwargs in (dict(temperature=0), dict(temperature=0.8, top_k=5), dict(top_p=0.7)):
        np.testing.assert_array_equal(sample_next(logits, rng=np.random.default_rng(1), **kwargs),
                                      sample_next(array, rng=np.random.default_rng(1), **kwargs))
    np.testing.assert_array_equal(sampling_probs(logits, 0.8), sampling_probs(array, 0.8))
    for temperature in (0, 1.0):
        with pytest.raises(ValueError, match=r"expected logits of shape \(batch, vocab\), got \(23,\)"):
            sample_next(array[0], temperature, rng=np.random.default_rng(0))


# ------------------------------------------------------------------ samplers: frequencies vs NumPy softmax

N_DRAWS = 100_000
SAMPLER_CASES = [dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.5),
                 dict(temperature=0.8, top_k=4), dict(temperature=1.5, top_p=0.8),
                 dict(temperature=1.2, top_k=5, top_p=0.9)]
FREQ_LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 0.0, 1.5, -0.5], dtype=np.float32)


def chi_square_bound(dof, failure_probability):
    """x with P(chi2(dof) >= x) <= failure_probability (Laurent & Massart 2000, Lemma 1:
    P(X - k >= 2 sqrt(k t) + 2 t) <= e^-t). Looser than the exact quantile, which leaves room for
    Pearson's statistic being chi-square only asymptotically (every expected count here is >= 100)."""
    t = math.log(1 / failure_probability)
    return dof + 2 * math.sqrt(dof * t) + 2 * t


def pearson_statistic(draws, probs):
    counts = np.bincount(draws, minlength=probs.size)
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token of probability 0"
    expected = draws.size * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def softmax_reference(kwargs):
    """The distribution from NumPy alone: softmax(z / T), the top-k largest, the top-p nucleus."""
    z = FREQ_LOGITS.astype(np.float64) / kwargs["temperature"]
    p = np.exp(z - z.max())
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(p.size, dtype=bool)
    keep[order[:kwargs.get("top_k") or p.size]] = True
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    if kwargs.get("top_p") is not None:
        before = np.cumsum(p[order]) - p[order]
        p[order[before >= kwargs["top_p"]]] = 0.0
        p /= p.sum()
    return p


@pytest.mark.parametrize("kwargs", SAMPLER_CASES, ids=str)
def test_sampled_frequencies_match_the_numpy_softmax(kwargs):
    """100,000 draws (fixed seed) against softmax(z / T) with a chi-square bound that a correct sampler
    exceeds with probability <= 1e-6 over all these cases together; the same draws measured against the
    distribution of a 15%-off temperature must exceed it (the test can fail)."""
    probs = softmax_reference(kwargs)
    assert probs.min() < probs.max()
    expected_counts = N_DRAWS * probs[probs > 0]
    assert expected_counts.min() >= 100
    draws = sample_next(np.tile(FREQ_LOGITS, (N_DRAWS, 1)), rng=np.random.default_rng(2024), **kwargs)
    statistic, dof = pearson_statistic(draws, probs)
    bound = chi_square_bound(dof, 1e-6 / len(SAMPLER_CASES))
    assert statistic < bound, (statistic, bound)
    wrong = softmax_reference({**kwargs, "temperature": kwargs["temperature"] * 1.15})
    if np.array_equal(wrong > 0, probs > 0) and dof > 0:
        assert pearson_statistic(draws, wrong)[0] > bound


def test_generation_draws_from_the_softmax_of_the_models_logits():
    """One generation step over a batch of 30,000 identical prompts: the first new token's frequencies
    against softmax(logits / T) of the model's own last-position logits (NumPy)."""
    model = make_model("llama")
    prompt = np.array([4, 9, 1])
    with mm.no_grad():
        logits = model(prompt[None]).numpy()[0, -1].astype(np.float64)
    for temperature in (0.7, 1.8):
        z = logits / temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        draws = generate(model, np.tile(prompt, (30_000, 1)), 1, temperature=temperature, seed=9)[:, -1]
        keep = 30_000 * probs >= 30                                   # pool the rare tokens into one cell
        pooled = np.append(probs[keep], probs[~keep].sum())
        draw_cells = np.where(keep[draws], np.cumsum(keep)[draws] - 1, keep.sum())
        statistic, dof = pearson_statistic(draw_cells, pooled)
        assert statistic < chi_square_bound(dof, 0.5e-6), (temperature, statistic)


# ------------------------------------------------------------------ seed


def test_seed_reproducibility_and_independence_from_the_global_stream():
    model = make_model("gpt2")
    prompt = np.random.default_rng(10).integers(0, V, (3, 2))
    mm.manual_seed(1)
    a = generate(model, prompt, 20, temperature=1.1, top_p=0.95, seed=123)
    mm.manual_seed(2)                                              # the global stream does not matter
    b = generate(model, prompt, 20, temperature=1.1, top_p=0.95, seed=123, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, generate(model, prompt, 20, temperature=1.1, top_p=0.95, seed=124))
    assert len({tuple(row) for row in a[:, 2:]}) > 1 or len(set(prompt[:, -1])) == 1
    # with a seed, generate leaves mm's global stream where it was
    mm.manual_seed(5)
    generate(model, prompt, 5, seed=1)
    after = backend.cpu_generator().random()
    mm.manual_seed(5)
    assert backend.cpu_generator().random() == after
    # seed=None: one seed drawn from the global stream per call
    mm.manual_seed(6)
    c = generate(model, prompt, 12)
    d = generate(model, prompt, 12)
    mm.manual_seed(6)
    np.testing.assert_array_equal(generate(model, prompt, 12), c)
    np.testing.assert_array_equal(generate(model, prompt, 12), d)


# ------------------------------------------------------------------ eos, streaming


def first_hits(out, prompt_len, token):
    return [prompt_len + int(np.flatnonzero(row[prompt_len:] == token)[0]) if (row[prompt_len:] == token).any()
            else None for row in out]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_rows_stop_at_eos_at_different_times(arch):
    """Sampled, batch of 3: each row is the free run up to its own first eos, then eos; the loop ends with
    the last row's eos; the stream sees exactly the returned new columns."""
    model = make_model(arch)
    prompt = np.random.default_rng(12).integers(0, V, (3, 3))
    sampling = dict(temperature=1.0, seed=21)
    free = generate(model, prompt, 3 * C, **sampling)
    candidates = [token for token in range(V)
                  if None not in first_hits(free, 3, token) and len(set(first_hits(free, 3, token))) == 3]
    assert candidates, "no token that every row produces at a different step"
    eos = candidates[0]
    stops = first_hits(free, 3, eos)
    columns = []
    out = generate(model, prompt, 3 * C, eos_id=eos, stream=columns.append, **sampling)
    assert out.shape == (3, max(stops) + 1)
    for row, stop in enumerate(stops):
        np.testing.assert_array_equal(out[row, :stop + 1], free[row, :stop + 1])
        assert (out[row, stop + 1:] == eos).all()
    np.testing.assert_array_equal(out, reference_generate(model, prompt, 3 * C, eos_id=eos, **sampling))
    np.testing.assert_array_equal(generate(model, prompt, 3 * C, eos_id=eos, use_cache=False, **sampling), out)
    assert len(columns) == out.shape[1] - 3
    np.testing.assert_array_equal(np.stack(columns, axis=1), out[:, 3:])


def test_eos_in_the_prompt_does_not_stop():
    model = make_model("gpt2")
    out = generate(model, [[5, 5, 5]], 6, temperature=0, eos_id=5)
    free = generate(model, [[5, 5, 5]], 6, temperature=0)
    stop = first_hits(free, 3, 5)[0]
    assert out.shape[1] == (9 if stop is None else stop + 1) and out.shape[1] > 3
    np.testing.assert_array_equal(out, free[:, :out.shape[1]])


def test_stream_receives_exactly_the_new_columns_as_copies():
    model = make_model("llama")
    prompt = np.random.default_rng(13).integers(0, V, (2, 5))
    received = []

    def stream(column):
        received.append((column.copy(), column.dtype, column.shape))
        column[:] = 0                                   # scribbling on it changes nothing returned
    out = generate(model, prompt, 3 * C, temperature=0.9, seed=3, stream=stream)   # slides the window too
    assert len(received) == 3 * C
    assert all(dtype == np.int64 and shape == (2,) for _, dtype, shape in received)
    np.testing.assert_array_equal(np.stack([c for c, _, _ in received], axis=1), out[:, 5:])
    np.testing.assert_array_equal(out, generate(model, prompt, 3 * C, temperature=0.9, seed=3))
    generate(model, prompt, 0, stream=received.append)
    assert len(received) == 3 * C                       # no new token, no call


# ------------------------------------------------------------------ modes restored


def mode_state(model):
    return [module.training for module in model.modules()]


@pytest.mark.parametrize("use_cache", [True, False])
def test_train_and_grad_modes_are_restored_also_after_an_exception(use_cache):
    model = make_model("gpt2").train()
    model.h[1].eval()                                  # a mixed state comes back exactly
    before = mode_state(model)

    class Stop(Exception):
        pass

    def failing_stream(column):
        if len(calls) == 2:
            raise Stop
        calls.append(column)

    calls = []
    with pytest.raises(Stop):
        generate(model, [[1, 2]], 10, stream=failing_stream, use_cache=use_cache)
    assert mode_state(model) == before and mm.is_grad_enabled()

    forward, steps = model.h[0].forward, []

    def failing_block(*args, **kwargs):
        assert not mm.is_grad_enabled() and not model.training   # eval, no_grad inside generate
        steps.append(1)
        if len(steps) == 3:
            raise Stop
        return forward(*args, **kwargs)
    model.h[0].forward = failing_block
    try:
        with pytest.raises(Stop):
            generate(model, [[1, 2]], 10, use_cache=use_cache)
    finally:
        del model.h[0].forward
    assert mode_state(model) == before and mm.is_grad_enabled()

    with mm.no_grad():                                 # called with grad off: it stays off
        generate(model, [[1, 2]], 3, use_cache=use_cache)
        assert not mm.is_grad_enabled()
    assert mm.is_grad_enabled() and mode_state(model) == before
    model.eval()


# ------------------------------------------------------------------ bad inputs, before any work

BAD_INPUTS = [
    # (ids, max_new_tokens, keyword arguments, exception, message)
    ([[1, 2]], -1, {}, ValueError, "max_new_tokens"),
    ([[1, 2]], 2.5, {}, ValueError, "max_new_tokens"),
    ([[1, 2]], 3.0, {}, ValueError, "max_new_tokens"),
    ([[1, 2]], True, {}, ValueError, "max_new_tokens"),
    ([[1, 2]], "3", {}, ValueError, "max_new_tokens"),
    ([[1, 2]], None, {}, ValueError, "max_new_tokens"),
    ([[1, V]], 3, {}, ValueError, f"token id {V} is outside the model's vocabulary"),
    ([[-1, 2]], 3, {}, ValueError, "token id -1 is outside"),
    (np.array([[1.0, 2.0]]), 3, {}, TypeError, "integers"),
    ([[1.5, 2]], 3, {}, TypeError, "integers"),
    ([[True, False]], 3, {}, TypeError, "integers"),
    ([], 3, {}, ValueError, "non-empty"),
    ([[]], 3, {}, ValueError, "non-empty"),
    (np.zeros((0, 3), dtype=np.int64), 3, {}, ValueError, "non-empty"),
    (np.zeros((1, 2, 2), dtype=np.int64), 3, {}, ValueError, r"\(T,\) or \(batch, T\)"),
    (5, 3, {}, ValueError, r"\(T,\) or \(batch, T\)"),
    ([[1, 2], [3]], 3, {}, ValueError, "equal length"),
    ([[1, 2]], 3, dict(temperature=-0.5), ValueError, "temperature"),
    ([[1, 2]], 3, dict(temperature=float("nan")), ValueError, "temperature"),
    ([[1, 2]], 3, dict(temperature=float("inf")), ValueError, "temperature"),
    ([[1, 2]], 3, dict(top_p=0.0), ValueError, "top_p"),
    ([[1, 2]], 3, dict(top_p=-0.1), ValueError, "top_p"),
    ([[1, 2]], 3, dict(top_p=1.0001), ValueError, "top_p"),
    ([[1, 2]], 3, dict(top_p=float("nan")), ValueError, "top_p"),
    ([[1, 2]], 3, dict(top_k=0), ValueError, "top_k"),
    ([[1, 2]], 3, dict(top_k=-2), ValueError, "top_k"),
    ([[1, 2]], 3, dict(top_k=2.0), ValueError, "top_k"),
    ([[1, 2]], 3, dict(eos_id=V), ValueError, "eos_id"),
    ([[1, 2]], 3, dict(eos_id=-1), ValueError, "eos_id"),
    ([[1, 2]], 3, dict(eos_id=1.0), ValueError, "eos_id"),
    ([[1, 2]], 3, dict(eos_id=True), ValueError, "eos_id"),
    ([[1, 2]], 3, dict(window_keep=0), ValueError, "window_keep"),
    ([[1, 2]], 3, dict(window_keep=C + 1), ValueError, "window_keep"),
    ([[1, 2]], 3, dict(seed=-1), ValueError, "seed"),
    ([[1, 2]], 3, dict(seed=1.5), ValueError, "seed"),
    ([[1, 2]], 3, dict(seed="7"), ValueError, "seed"),
    ([[1, 2]], 3, dict(stream=3), TypeError, "stream"),
]


@pytest.mark.parametrize("ids, max_new_tokens, kwargs, error, message", BAD_INPUTS,
                         ids=[f"{i}-{case[4][:20]}" for i, case in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_refused_before_any_work(ids, max_new_tokens, kwargs, error, message, monkeypatch):
    model = make_model("gpt2").train()
    work = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: work.append("forward"))
    monkeypatch.setattr(model, "new_kv_cache", lambda *a, **k: work.append("cache"))
    monkeypatch.setattr(model, "eval", lambda *a, **k: work.append("eval"))
    with pytest.raises(error, match=message):
        generate(model, ids, max_new_tokens, **kwargs)
    assert work == [] and model.training and mm.is_grad_enabled()
