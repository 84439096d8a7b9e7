"""Hugging Face directories written here from scratch, read by load_hf, checked against a second, independent
NumPy Llama/Qwen3 forward (complex-number rotary, a per-head loop, Hugging Face tensor names; it shares no code
with tests/nn/nn_numpy_reference.py); and save_hf -> load_hf round trips of every family, bit for bit, with
the loaded model's KV-cache pass equal to its full pass."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm.backend import to_numpy
from minillm.models import GPT, GPTConfig
from minillm.weights import load_hf, save_hf
from minillm.weights.safetensors import save_file

# ------------------------------------------------------------------ the reference, on Hugging Face names


def inverse_frequencies(dim, theta, scaling):
    """θ^(-2j/dim), j < dim/2; Llama 3 scaling as transformers' _compute_llama3_parameters defines it."""
    inv = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if scaling is None:
        return inv
    old, low, high, factor = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                              scaling["high_freq_factor"], scaling["factor"])
    wavelength = 2 * np.pi / inv
    smooth = (old / wavelength - low) / (high - low)
    medium = (wavelength >= old / high) & (wavelength <= old / low)
    return np.where(wavelength > old / low, inv / factor,
                    np.where(medium, (1 - smooth) * inv / factor + smooth * inv, inv))


def rms(x, weight, eps):
    return weight * x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps)


def rotate(x, angles):
    """x (T, Dh): feature j and j + Dh/2 are one complex number, turned by angles (T, Dh/2)."""
    half = x.shape[-1] // 2
    z = (x[:, :half] + 1j * x[:, half:]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


def reference_logits(t, hf, ids):
    """LlamaForCausalLM / Qwen3ForCausalLM on one sequence ``ids`` (T,), float64, from tensors ``t``."""
    H, K, D, eps = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["rms_norm_eps"]
    T = len(ids)
    angles = np.arange(T)[:, None] * inverse_frequencies(D, hf["rope_theta"], hf["rope_scaling"])[None]
    future = np.triu(np.ones((T, T), bool), k=1)
    x = t["model.embed_tokens.weight"][ids]                                       # (T, C)
    for i in range(hf["num_hidden_layers"]):
        w = {name[len(f"model.layers.{i}."):]: a for name, a in t.items() if name.startswith(f"model.layers.{i}.")}
        h = rms(x, w["input_layernorm.weight"], eps)
        q, k, v = (h @ w[f"self_attn.{n}_proj.weight"].T for n in "qkv")        # (T, H·D), (T, K·D), (T, K·D)
        heads = []
        for head in range(H):
            group = head // (H // K)                                              # the k/v head it shares
            qh, kh, vh = q[:, head * D:(head + 1) * D], k[:, group * D:(group + 1) * D], v[:, group * D:(group + 1) * D]
            if hf["model_type"] == "qwen3":
                qh, kh = rms(qh, w["self_attn.q_norm.weight"], eps), rms(kh, w["self_attn.k_norm.weight"], eps)
            scores = rotate(qh, angles) @ rotate(kh, angles).T / math.sqrt(D)
            scores[future] = -np.inf
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            heads.append((p / p.sum(axis=1, keepdims=True)) @ vh)
        x = x + np.concatenate(heads, axis=1) @ w["self_attn.o_proj.weight"].T
        h = rms(x, w["post_attention_layernorm.weight"], eps)
        gate, up = h @ w["mlp.gate_proj.weight"].T, h @ w["mlp.up_proj.weight"].T
        x = x + (gate * up / (1 + np.exp(-gate))) @ w["mlp.down_proj.weight"].T
    x = rms(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


# ------------------------------------------------------------------ directories written by the test


@st.composite
def llama_family(draw):
    n_head = draw(st.sampled_from([2, 4]))
    qwen = draw(st.booleans())
    return {
        "model_type": "qwen3" if qwen else "llama",
        "architectures": ["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"],
        "vocab_size": draw(st.integers(5, 30)), "hidden_size": draw(st.sampled_from([8, 12])),
        "intermediate_size": draw(st.integers(3, 20)), "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": n_head, "num_key_value_heads": draw(st.sampled_from([k for k in (1, 2, 4)
                                                                                   if n_head % k == 0])),
        "head_dim": draw(st.sampled_from([2, 4, 6])), "hidden_act": "silu", "max_position_embeddings": 64,
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5])), "rope_theta": draw(st.sampled_from([10.0, 1e4, 1e6])),
        # original 8: wavelengths 2π … are medium (smoothed) or long; 32: 2π < 32/4 is a short one, kept as is
        "rope_scaling": draw(st.sampled_from([None] + [{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": old} for old in (8, 32)])),
        "tie_word_embeddings": draw(st.booleans()), "attention_bias": False,
    }


def hf_tensors(hf, rng):
    C, V, I = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
    H, K, D = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]

    def w(*shape, scale=0.5):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm(n):
        return (1 + 0.3 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, C), "model.norm.weight": norm(C)}
    if not hf["tie_word_embeddings"]:
        t["lm_head.weight"] = w(V, C)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm(C), p + "post_attention_layernorm.weight": norm(C),
                  p + "self_attn.q_proj.weight": w(H * D, C), p + "self_attn.k_proj.weight": w(K * D, C),
                  p + "self_attn.v_proj.weight": w(K * D, C), p + "self_attn.o_proj.weight": w(C, H * D),
                  p + "mlp.gate_proj.weight": w(I, C), p + "mlp.up_proj.weight": w(I, C),
                  p + "mlp.down_proj.weight": w(C, I)})
        if hf["model_type"] == "qwen3":
            t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"] = norm(D), norm(D)
    return t


@settings(max_examples=30, deadline=None)
@given(hf=llama_family(), seed=st.integers(0, 2 ** 16), T=st.integers(1, 12))
def test_load_hf_matches_the_independent_numpy_forward(tmp_path_factory, hf, seed, T):
    rng = np.random.default_rng(seed)
    tensors = hf_tensors(hf, rng)
    path = tmp_path_factory.mktemp("hf")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf))
    model = load_hf(path)                                                          # float32
    ids = rng.integers(0, hf["vocab_size"], (2, T))
    with mm.no_grad():
        logits = model(ids).numpy()
    assert logits.dtype == np.float32
    t64 = {k: v.astype(np.float64) for k, v in tensors.items()}
    expected = np.stack([reference_logits(t64, hf, row) for row in ids])
    np.testing.assert_allclose(logits, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


# ------------------------------------------------------------------ save_hf -> load_hf, every family


@st.composite
def any_family(draw):
    family = draw(st.sampled_from(["gpt2", "llama", "qwen3"]))
    common = dict(vocab_size=draw(st.integers(5, 30)), context_length=draw(st.integers(12, 40)),
                  n_layer=draw(st.integers(1, 2)), n_head=4, d_model=8)
    if family == "gpt2":
        return GPTConfig(**common, gelu_approximate=draw(st.sampled_from(["tanh", "none"])),
                         layer_norm_eps=draw(st.sampled_from([1e-5, 1e-6])))
    return GPTConfig(**common, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                     n_kv_head=draw(st.sampled_from([1, 2, 4])), head_dim=draw(st.sampled_from([2, 4])),
                     mlp_hidden=draw(st.integers(3, 12)), qk_norm=family == "qwen3",
                     tie_embeddings=draw(st.booleans()), rope_theta=draw(st.sampled_from([100.0, 5e5])),
                     rope_scaling=draw(st.sampled_from([None, dict(rope_type="llama3", factor=4.0,
                                                                   low_freq_factor=1.0, high_freq_factor=2.0,
                                                                   original_max_position_embeddings=6)])),
                     layer_norm_eps=draw(st.sampled_from([1e-5, 1e-6])))


@settings(max_examples=30, deadline=None)
@given(cfg=any_family(), seed=st.integers(0, 2 ** 16), shards=st.booleans())
def test_save_then_load_is_bit_for_bit_and_the_cache_agrees(tmp_path_factory, cfg, seed, shards):
    rng = np.random.default_rng(seed)
    model = GPT(cfg)
    state = {k: (to_numpy(v) + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)     # norms off 1, biases on
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    path = tmp_path_factory.mktemp("out")
    save_hf(model, path, max_shard_bytes=2_000 if shards else None)
    loaded = load_hf(path)
    assert loaded.config == cfg
    again = loaded.state_dict()
    assert sorted(again) == sorted(state)
    for name, array in state.items():
        np.testing.assert_array_equal(to_numpy(again[name]), array, err_msg=name)
    ids = rng.integers(0, cfg.vocab_size, (2, 9))
    with mm.no_grad():
        full = loaded(ids).numpy()
        np.testing.assert_array_equal(full, model(ids).numpy())
        cache = loaded.new_kv_cache(2, 9)
        steps = [loaded(ids[:, a:b], cache=cache).numpy() for a, b in ((0, 4), (4, 5), (5, 9))]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


# ------------------------------------------------------------------ config.json values that are not defaults


def test_zero_kv_heads_or_head_dim_in_config_json_are_refused_not_defaulted():
    """0 is not "absent": it was silently read as n_head (plain multi-head attention) / hidden_size // heads."""
    from minillm.weights.hf_llama import config_from_hf  # noqa: PLC0415

    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    assert (config_from_hf(base).n_kv_head, config_from_hf(base).head_dim) == (4, 4)          # absent: defaults
    assert config_from_hf({**base, "num_key_value_heads": None, "head_dim": None}).n_kv_head == 4
    for field, ours in (("num_key_value_heads", "n_kv_head"), ("head_dim", "head_dim")):
        with pytest.raises(ValueError, match=f"{ours} must be a positive integer or None, got 0"):
            config_from_hf({**base, field: 0})


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", 0, "n_head must be a positive integer, got 0"),            # was ZeroDivisionError
    ("num_attention_heads", "4", "n_head must be a positive integer, got '4'"),        # was TypeError
    ("hidden_size", "16", "d_model must be a positive integer, got '16'"),             # was TypeError
])
def test_bad_head_counts_in_config_json_are_value_errors_naming_the_field(field, value, message):
    from minillm.weights.hf_llama import config_from_hf  # noqa: PLC0415

    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 4}
    with pytest.raises(ValueError, match=message):
        config_from_hf({**base, field: value})
