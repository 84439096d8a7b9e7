"""Generation: the KV cache against full recomputation, the samplers against their definitions."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm.generate import generate, inverse_cdf_sample, sample_next, sampling_probs
from minillm.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=61, context_length=32, n_layer=2, n_head=2, d_model=16)


def make_model(device="cpu", config=CONFIG):
    """A small GPT with weights large enough that its logits are far from uniform (no near-ties)."""
    mm.manual_seed(0)
    model = GPT(config)
    rng = np.random.default_rng(1)
    for param in model.parameters():
        param.data[...] = rng.standard_normal(param.shape).astype(np.float32) * 0.3
    return model.to(device)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------ the KV cache


def test_cached_logits_equal_full_recomputation(device):
    model = make_model(device).eval()
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 30))
    with mm.no_grad():
        full = model(ids).numpy()                                      # (3, 30, V), no cache
        cache = model.new_kv_cache(3, 30)
        steps = [model(ids[:, :5], cache=cache).numpy()]               # prefill 5 positions
        for t in range(5, 30):
            steps.append(model(ids[:, t:t + 1], cache=cache).numpy())   # then one at a time
    assert cache.pos == 30
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_cached_and_uncached_generation_give_the_same_tokens(device):
    model = make_model(device)
    prompt = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (2, 4))
    cached = generate(model, prompt, 28, temperature=0)
    uncached = generate(model, prompt, 28, temperature=0, use_cache=False)
    np.testing.assert_array_equal(cached, uncached)
    assert cached.shape == (2, 32) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached[:, :4], prompt)
    sampled = [generate(model, prompt, 20, temperature=0.9, top_k=10, top_p=0.9, seed=5, use_cache=c)
               for c in (True, False)]
    np.testing.assert_array_equal(*sampled)


def test_greedy_is_the_argmax_of_the_full_forward():
    model = make_model()
    prompt = np.array([[5, 9, 2]])
    out = generate(model, prompt, 6, temperature=0)
    with mm.no_grad():
        for t in range(3, 9):
            assert out[0, t] == np.argmax(model(out[:, :t]).numpy()[0, -1])


def test_batched_rows_are_independent():
    model = make_model()
    prompts = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (3, 5))
    batched = generate(model, prompts, 10, temperature=0)
    for row in range(3):
        np.testing.assert_array_equal(batched[row], generate(model, prompts[row], 10, temperature=0))


def test_cache_is_sized_to_the_tokens_fed_back(monkeypatch):
    """docs/generation.md: the cache holds prompt + max_new_tokens - 1 positions (the last new token is
    never fed back), at most the context length."""
    model = make_model()
    sizes = []
    real = model.new_kv_cache
    monkeypatch.setattr(model, "new_kv_cache", lambda batch, max_len=None: sizes.append((batch, max_len)) or
                        real(batch, max_len))
    generate(model, np.zeros((2, 4), dtype=np.int64), 10, temperature=0)
    generate(model, np.zeros((1, 4), dtype=np.int64), 40, temperature=0)     # 4 + 40 - 1 > context 32
    assert sizes == [(2, 13), (1, 32)]


def test_kv_cache_memory_of_gpt2_small():
    """docs/generation.md: 2 · n_layer · B · max_len · C floats, 75 MB for GPT-2 124M at B = 1, 1024 positions."""
    assert GPTConfig.from_preset("gpt2-124m").kv_cache_bytes(1024) == 2 * 12 * 1024 * 768 * 4 == 75_497_472


def test_generation_continues_past_the_context():
    # the window slides (tests/test_generate_window.py checks the tokens); the model itself still refuses
    model = make_model()
    assert generate(model, np.zeros((1, 30), dtype=np.int64), 3, temperature=0).shape == (1, 33)
    with pytest.raises(ValueError, match="exceeds"):
        model(np.zeros((1, 33), dtype=np.int64))


def test_argument_errors():
    model = make_model()
    for kwargs, message in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                            (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                            (dict(eos_id=61), "eos_id")]:
        with pytest.raises(ValueError, match=message):
            generate(model, [[1, 2]], 3, **kwargs)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, 99]], 3)
    with pytest.raises(TypeError, match="integers"):
        generate(model, np.ones((1, 2)), 3)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, np.zeros((1, 0), dtype=np.int64), 3)


def test_modes_are_restored_and_prompt_shape_kept():
    model = make_model().train()
    out = generate(model, [4, 5, 6], 3, temperature=0)
    assert out.shape == (6,) and model.training and mm.is_grad_enabled()
    np.testing.assert_array_equal(generate(model, [4, 5, 6], 0), [4, 5, 6])
    np.testing.assert_array_equal(model.generate(np.array([[4, 5, 6]]), 3, temperature=0)[0], out)
    model.h[0].eval()                                          # mixed modes come back as they were
    generate(model, [4, 5, 6], 2)
    assert model.training and not model.h[0].training and model.h[1].training


def test_generation_ignores_dropout():
    model = make_model(config=GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.5})).train()
    a = generate(model, [[1, 2]], 10, temperature=0)
    b = generate(model, [[1, 2]], 10, temperature=0, use_cache=False)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ eos and streaming


def test_rows_stop_at_eos_and_generation_ends_when_all_have():
    model = make_model()
    prompts = np.array([[1, 2, 3], [7, 8, 9]])
    free = generate(model, prompts, 12, temperature=0)
    eos = int(free[0, 3 + 4])                                  # a token row 0 produces

    def first_stop(row):                                       # index of the row's first eos, else None
        hits = np.flatnonzero(free[row, 3:] == eos)
        return 3 + int(hits[0]) if hits.size else None

    columns = []
    out = generate(model, prompts, 12, temperature=0, eos_id=eos, stream=columns.append)
    stops = [first_stop(0), first_stop(1)]
    length = 15 if stops[1] is None else max(stops) + 1        # the loop ends once every row stopped
    assert out.shape == (2, length)
    for row, stop in enumerate(stops):
        end = length if stop is None else stop + 1
        np.testing.assert_array_equal(out[row, :end], free[row, :end])   # identical until its eos
        assert (out[row, end:] == eos).all()                   # then padded with eos
    np.testing.assert_array_equal(np.stack(columns, axis=1), out[:, 3:])
    both = generate(model, np.array([[1, 2, 3], [1, 2, 3]]), 12, temperature=0, eos_id=eos)
    assert both.shape == (2, stops[0] + 1) and (both[:, -1] == eos).all()


# ------------------------------------------------------------------ sampling


def test_seed_makes_sampling_reproducible():
    model = make_model()
    a = generate(model, [[1, 2]], 20, temperature=1.0, seed=11)
    b = generate(model, [[1, 2]], 20, temperature=1.0, seed=11)
    c = generate(model, [[1, 2]], 20, temperature=1.0, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    mm.manual_seed(4)
    d = generate(model, [[1, 2]], 20)
    mm.manual_seed(4)
    np.testing.assert_array_equal(d, generate(model, [[1, 2]], 20))   # seed=None follows mm.manual_seed


def reference_sample(logits, uniforms, temperature=1.0, top_k=None, top_p=None):
    """The sampler from its definition, row by row in Python floats: sort, keep the top k, keep the
    nucleus (tokens whose more likely predecessors hold < top_p of the mass), renormalise, then the
    first token (in vocabulary order) whose cumulative probability exceeds u."""
    ids = []
    for row, u in zip(np.asarray(logits, dtype=np.float64).tolist(), uniforms):
        if temperature == 0:
            ids.append(max(range(len(row)), key=lambda i: (row[i], -i)))
            continue
        order = sorted(range(len(row)), key=lambda i: -row[i])[:top_k]    # most likely first
        weights = {i: math.exp((row[i] - row[order[0]]) / temperature) for i in order}
        if top_p is not None:
            total, mass_before, nucleus = sum(weights.values()), 0.0, {}
            for i in order:
                if mass_before >= top_p:
                    break
                nucleus[i] = weights[i]
                mass_before += weights[i] / total
            weights = nucleus
        total, cumulative = sum(weights.values()), 0.0
        chosen = max(weights)                                             # if u rounds up to the total
        for i in sorted(weights):
            cumulative += weights[i] / total
            if u < cumulative:
                chosen = i
                break
        ids.append(chosen)
    return np.array(ids)


def test_sampling_is_identical_on_every_device(device):
    """sample_next on the device's logits, and on a float64 host copy, against the reference sampler
    above fed the same uniforms (one per row from the Generator): the same ids, row for row."""
    logits = np.random.default_rng(0).standard_normal((64, 100)).astype(np.float32) * 3
    on_device = mm.Tensor(logits, device=device).data
    host_float64 = logits.astype(np.float64)
    for kwargs in (dict(), dict(top_k=7), dict(top_p=0.6, temperature=0.7), dict(top_k=20, top_p=0.9),
                   dict(temperature=2.5, top_k=3), dict(temperature=0)):
        for seed in (9, 10):
            expected = reference_sample(logits, np.random.default_rng(seed).random(len(logits)), **kwargs)
            for x in (on_device, host_float64):
                np.testing.assert_array_equal(sample_next(x, rng=np.random.default_rng(seed), **kwargs), expected,
                                              err_msg=str(kwargs))


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(1).standard_normal((5, 30))
    np.testing.assert_array_equal(sample_next(logits, temperature=0), logits.argmax(-1))


def many_draws(logits_row, n, **kwargs):
    """n samples from one distribution: the row repeated n times, one uniform per row."""
    return sample_next(np.tile(logits_row, (n, 1)), rng=np.random.default_rng(0), **kwargs)


def test_temperature_sampling_matches_the_softmax():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0], dtype=np.float32)
    for temperature in (1.0, 0.5, 2.0):
        draws = many_draws(logits, 40_000, temperature=temperature)
        freq = np.bincount(draws, minlength=5) / draws.size
        np.testing.assert_allclose(freq, softmax(logits.astype(np.float64) / temperature), atol=0.01)


def test_top_k_never_emits_outside_the_top_k():
    rng = np.random.default_rng(2)
    for k in (1, 3, 10):
        logits = rng.standard_normal(50).astype(np.float32)
        top = set(np.argsort(logits)[-k:].tolist())
        draws = many_draws(logits, 20_000, top_k=k, temperature=2.0)
        assert set(draws.tolist()) == top                      # never outside, and every one of them drawn
        freq = np.bincount(draws, minlength=50)[sorted(top)] / draws.size
        expected = softmax(logits[sorted(top)].astype(np.float64) / 2.0)
        np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_p_emits_only_the_nucleus():
    rng = np.random.default_rng(3)
    for p in (0.3, 0.75, 0.95):
        logits = (rng.standard_normal(40) * 2).astype(np.float32)
        probs = softmax(logits.astype(np.float64))
        order = np.argsort(-probs)
        size = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)   # smallest prefix with mass >= p
        nucleus = order[:size]
        assert probs[nucleus].sum() >= p and probs[nucleus[:-1]].sum() < p
        draws = many_draws(logits, 20_000, top_p=p)
        assert set(draws.tolist()) <= set(nucleus.tolist())
        freq = np.bincount(draws, minlength=40)[nucleus] / draws.size
        np.testing.assert_allclose(freq, probs[nucleus] / probs[nucleus].sum(), atol=0.015)


def test_sampling_probs_worked_example():
    probs = sampling_probs(np.log([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]), top_p=0.7)
    np.testing.assert_allclose(probs, [[0.625, 0.375, 0.0], [0.0, 2 / 3, 1 / 3]])
    probs = sampling_probs(np.log([[0.5, 0.3, 0.2]]), top_k=1)
    np.testing.assert_array_equal(probs, [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(sampling_probs(np.log([[0.5, 0.3, 0.2]]), top_p=1.0), [[0.5, 0.3, 0.2]])


def test_top_k_keeps_exactly_k_even_among_ties():
    """docs/generation.md: exactly k tokens survive top-k (np.argpartition), also when logits tie."""
    probs = sampling_probs(np.zeros((2, 10)), top_k=3)
    assert ((probs > 0).sum(axis=-1) == 3).all()
    np.testing.assert_allclose(probs[probs > 0], 1 / 3)
    probs = sampling_probs(np.array([[1.0, 5.0, 5.0, 5.0, 5.0, 0.0]]), top_k=2)   # four tie for the top
    assert (probs > 0).sum() == 2 and set(np.flatnonzero(probs[0])) <= {1, 2, 3, 4}


def test_top_p_keeps_the_first_token_and_follows_top_k():
    """docs/generation.md: the most likely token always survives top-p; top-k is applied first, then top-p.
    Hand-worked: p = [0.4, 0.3, 0.2, 0.1]; top_k=2 gives [4/7, 3/7, 0, 0]; then top_p=0.5 keeps the first
    only (mass before the second is 4/7 >= 0.5). The other order would keep two (0.4 < 0.5)."""
    np.testing.assert_array_equal(sampling_probs(np.log([[0.2, 0.5, 0.3]]), top_p=1e-9), [[0.0, 1.0, 0.0]])
    logits = np.log([[0.4, 0.3, 0.2, 0.1]])
    np.testing.assert_allclose(sampling_probs(logits, top_k=2), [[4 / 7, 3 / 7, 0, 0]])
    np.testing.assert_allclose(sampling_probs(logits, top_p=0.5), [[4 / 7, 3 / 7, 0, 0]])
    np.testing.assert_array_equal(sampling_probs(logits, top_k=2, top_p=0.5), [[1.0, 0.0, 0.0, 0.0]])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.0, 1e-9, 0.1, 1.0, 3.0]), min_size=1, max_size=12)
       .filter(lambda p: sum(p) > 0),
       st.floats(0.0, 1.0, exclude_max=True))
def test_inverse_cdf_never_picks_a_zero_probability_token(weights, u):
    probs = np.array([weights])
    cdf = np.cumsum(probs[0])
    last_positive = max(i for i, w in enumerate(weights) if w > 0)
    for uniform in (u, 0.0, np.nextafter(1.0, 0.0)):
        token = int(inverse_cdf_sample(probs, np.array([uniform]))[0])
        x = uniform * cdf[-1]
        assert probs[0, token] > 0
        assert (cdf[token - 1] if token else 0.0) <= x                      # u falls in token's interval
        assert x < cdf[token] or token == last_positive                     # (or rounded up past the end)
