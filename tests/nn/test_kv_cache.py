"""KV cache: cached decoding gives the logits and greedy tokens of full recomputation; misuse raises."""

import numpy as np
import pytest

import minillm as mm
from minillm import nn
from minillm.backend import to_numpy
from minillm.models import GPT, GPTConfig


def decisive_model(device, dtype=np.float32, **overrides):
    """A tiny GPT with large random weights, so its logits are far from uniform and argmax is stable."""
    config = GPTConfig.from_preset("tiny", vocab_size=97, context_length=32, n_layer=3, n_head=4, **overrides)
    model = GPT(config).to(device, dtype=dtype).eval()
    rng = np.random.default_rng(0)
    state = {}
    for name, array in model.state_dict().items():
        noise = rng.standard_normal(to_numpy(array).shape)
        is_norm_scale = name.split(".")[-2].startswith("ln") and name.endswith("weight")
        state[name] = 0.3 * noise if array.ndim == 2 else 0.1 * noise + is_norm_scale
    model.load_state_dict(state)
    return model


def full_logits(model, ids):
    with mm.no_grad():
        return model(ids).numpy()


def test_prefill_then_single_steps_match_recomputation(device):
    model = decisive_model(device)
    ids = np.random.default_rng(1).integers(0, 97, (2, 20))
    expected = full_logits(model, ids)                               # (B, T, V), no cache
    cache = model.new_kv_cache(batch=2)
    with mm.no_grad():
        prefill = model(ids[:, :7], cache=cache).numpy()             # positions 0..6
        assert cache.pos == 7
        steps = [model(ids[:, t:t + 1], cache=cache).numpy() for t in range(7, 20)]
    np.testing.assert_allclose(prefill, expected[:, :7], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected[:, 7:], rtol=1e-5, atol=1e-5)
    assert cache.pos == 20


def test_chunked_decoding_matches_recomputation(device):
    model = decisive_model(device)
    ids = np.random.default_rng(2).integers(0, 97, (1, 16))
    expected = full_logits(model, ids)
    cache = model.new_kv_cache(batch=1)
    chunks = []
    with mm.no_grad():
        for start, stop in [(0, 1), (1, 6), (6, 9), (9, 10), (10, 16)]:     # Tq < Tk with Tq > 1 too
            chunks.append(model(ids[:, start:stop], cache=cache).numpy())
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), expected, rtol=1e-5, atol=1e-5)


def greedy(model, prompt, steps, use_cache):
    """Greedy decoding written out, with or without the cache."""
    ids = prompt.copy()
    cache = model.new_kv_cache(batch=prompt.shape[0]) if use_cache else None
    with mm.no_grad():
        logits = model(ids, cache=cache).numpy()
        for _ in range(steps):
            next_ids = logits[:, -1].argmax(axis=-1)[:, None]        # (B, 1)
            ids = np.concatenate([ids, next_ids], axis=1)
            logits = model(next_ids if use_cache else ids, cache=cache).numpy()
    return ids


def test_greedy_tokens_identical_with_and_without_cache(device):
    model = decisive_model(device)
    prompt = np.random.default_rng(3).integers(0, 97, (3, 4))
    uncached = greedy(model, prompt, 20, use_cache=False)
    cached = greedy(model, prompt, 20, use_cache=True)
    np.testing.assert_array_equal(cached, uncached)
    assert len(set(uncached[0, 4:].tolist())) > 1                   # it really generated something


def test_cache_is_preallocated_and_written_in_place():
    cache = nn.KVCache(n_layer=2, batch=1, n_head=2, max_len=8, head_dim=3)
    arrays = [id(a) for a in cache.keys + cache.values]
    assert cache.keys[0].shape == (1, 2, 8, 3) and cache.keys[0].dtype == np.float32
    k = np.ones((1, 2, 5, 3), dtype=np.float32)
    keys, values = cache.update(1, k, 2 * k)
    assert keys.shape == (1, 2, 5, 3) and np.shares_memory(keys, cache.keys[1])
    cache.advance(5)
    keys, values = cache.update(1, 3 * k[:, :, :2], 4 * k[:, :, :2])
    assert keys.shape == (1, 2, 7, 3)
    np.testing.assert_array_equal(cache.keys[1][0, 0, :, 0], [1, 1, 1, 1, 1, 3, 3, 0])
    np.testing.assert_array_equal(values[0, 0, :, 0], [2, 2, 2, 2, 2, 4, 4])
    assert [id(a) for a in cache.keys + cache.values] == arrays     # never reallocated
    cache.reset()
    assert cache.pos == 0 and len(cache) == 0


def test_cache_requires_no_grad():
    model = decisive_model("cpu")
    cache = model.new_kv_cache(batch=1)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(np.zeros((1, 3), dtype=np.int64), cache=cache)


def test_cache_overflow_and_shape_errors():
    model = decisive_model("cpu")
    cache = model.new_kv_cache(batch=1, max_len=8)
    with mm.no_grad():
        model(np.zeros((1, 6), dtype=np.int64), cache=cache)
        with pytest.raises(ValueError, match="max_len=8"):
            model(np.zeros((1, 3), dtype=np.int64), cache=cache)
        with pytest.raises(ValueError, match="B=1"):
            model(np.zeros((2, 1), dtype=np.int64), cache=cache)
    with pytest.raises(ValueError, match="context_length=32"):
        model.new_kv_cache(batch=1, max_len=33)
    full = model.new_kv_cache(batch=1)
    with mm.no_grad():
        model(np.zeros((1, 30), dtype=np.int64), cache=full)
        with pytest.raises(ValueError, match="sequence length 33 .*context_length=32"):
            model(np.zeros((1, 3), dtype=np.int64), cache=full)
    with pytest.raises(ValueError, match="positive integer"):
        nn.KVCache(1, 0, 1, 4, 2)


def test_attention_layer_with_cache_matches_without():
    attn = nn.MultiHeadAttention(8, 2, init_std=0.5).eval()
    x = mm.Tensor(np.random.default_rng(4).standard_normal((2, 5, 8)).astype(np.float32))
    cache = nn.KVCache(n_layer=1, batch=2, n_head=2, max_len=5, head_dim=4)
    with mm.no_grad():
        expected = attn(x).numpy()
        first = attn(x[:, :3], cache=cache, layer_index=0).numpy()
        cache.advance(3)
        rest = attn(x[:, 3:], cache=cache, layer_index=0).numpy()
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_len", [4.0, 2.5, True, "4", None, 0, -1])
def test_cache_sizes_must_be_integers(max_len):
    """A size that is not a positive integer is named (4.0 and True were taken, then NumPy failed with
    "'float' object cannot be interpreted as an integer")."""
    with pytest.raises(ValueError, match=f"KVCache: max_len must be a positive integer, got {max_len!r}"):
        nn.KVCache(n_layer=1, batch=1, n_head=1, max_len=max_len, head_dim=2)
    assert nn.KVCache(1, np.int64(2), 1, np.int32(4), 2).keys[0].shape == (2, 1, 4, 2)
