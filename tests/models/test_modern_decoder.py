"""The configurable decoder as Llama / Qwen3: a plain NumPy reference in Hugging Face's form, gradients,
KV cache with rotary offsets, presets, parameter counts, GQA's cache saving."""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

import minillm as mm
from minillm import optim
from minillm.backend import to_numpy
from minillm.models import GPT, GPTConfig, gpt_num_parameters, llama_style

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from nn_numpy_reference import llama_logits  # noqa: E402

LLAMA3_SCALING = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=2.0,
                      original_max_position_embeddings=16)


def llama_tiny(**overrides):
    return GPTConfig.from_preset("llama-tiny", **overrides)


def qwen_tiny(**overrides):
    """Qwen3-style: q/k norm, head_dim not d_model / n_head, tied head."""
    return llama_tiny(head_dim=12, qk_norm=True, rope_theta=1e6, layer_norm_eps=1e-6, **overrides)


def perturbed_model(cfg, device="cpu"):
    model = GPT(cfg).to(device, dtype=np.float64)
    rng = np.random.default_rng(1)
    state = {k: to_numpy(v) + 0.1 * rng.standard_normal(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(state)                                  # norms away from 1
    return model, state


@pytest.mark.parametrize("make", [
    lambda: llama_tiny(tie_embeddings=False),
    lambda: llama_tiny(rope_scaling=LLAMA3_SCALING, n_kv_head=1),
    lambda: qwen_tiny(),
])
def test_forward_matches_the_numpy_llama(make, device):
    cfg = make()
    model, state = perturbed_model(cfg, device)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 11))
    np.testing.assert_allclose(model(ids).numpy(), llama_logits(ids, state, cfg), rtol=1e-9, atol=1e-10)


def test_llama_and_qwen_parameter_names():
    names = set(GPT(qwen_tiny(tie_embeddings=False)).state_dict())
    assert {"wte.weight", "lm_head.weight", "ln_f.weight", "h.0.attn.q_norm.weight", "h.0.attn.k_norm.weight",
            "h.0.attn.c_attn.weight", "h.0.mlp.c_fc.weight", "h.1.ln_2.weight"} <= names
    assert not any(name.endswith("bias") or name.startswith("wpe") for name in names)
    model = GPT(llama_tiny())
    assert model.h[0].attn.c_attn.weight.shape == ((4 + 2 + 2) * 8, 32)      # [q | k | v], GQA widths
    assert model.h[0].mlp.c_fc.weight.shape == (2 * 88, 32)                  # [gate | up]
    assert "lm_head.weight" not in model.state_dict()


@pytest.mark.parametrize("make", [llama_tiny, qwen_tiny, lambda: llama_tiny(tie_embeddings=False, bias=True)])
def test_num_parameters_matches_formula(make):
    cfg = make()
    assert GPT(cfg).num_parameters() == gpt_num_parameters(cfg)


def test_real_model_shapes_have_their_published_parameter_counts():
    assert gpt_num_parameters(GPTConfig.from_preset("llama-3.2-1b")) == 1_235_814_400
    assert gpt_num_parameters(GPTConfig.from_preset("qwen3-0.6b")) == 596_049_920


def test_rotary_bases_and_scaling_of_the_presets():
    """docs/model.md: θ = 10,000 by default, Llama 3 500,000 (Llama 3.2's scaling factor 32), Qwen3 1,000,000:
    the values of the published config.json files."""
    assert GPTConfig(positions="rope").rope_theta == 10_000.0
    llama = GPTConfig.from_preset("llama-3.2-1b")
    assert llama.rope_theta == 500_000.0
    assert llama.rope_scaling == dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192)
    qwen = GPTConfig.from_preset("qwen3-0.6b")
    assert (qwen.rope_theta, qwen.rope_scaling, qwen.qk_norm, qwen.layer_norm_eps) == (1_000_000.0, None, True, 1e-6)


def test_whole_llama_gradcheck():
    cfg = qwen_tiny(tie_embeddings=False, n_layer=1, rope_scaling=LLAMA3_SCALING)
    model, _ = perturbed_model(cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 5))
    targets = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 5))
    block = model.h[0]
    params = [block.ln_1.weight, block.attn.q_norm.weight, block.attn.k_norm.weight, block.attn.c_attn.weight,
              block.mlp.c_fc.weight, model.lm_head.weight, model.ln_f.weight]
    assert mm.gradcheck(lambda *p: model(ids, targets)[1], *params)


@pytest.mark.parametrize("make", [llama_tiny, qwen_tiny])
def test_kv_cache_equals_the_full_pass(make, device):
    """Rotary offsets: prefill 5, then 1, then 3 positions give the full pass's logits."""
    cfg = make(rope_scaling=LLAMA3_SCALING)
    model, _ = perturbed_model(cfg, device)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 9))
    with mm.no_grad():
        full = model(ids).numpy()
        cache = model.new_kv_cache(2, 9)
        assert cache.keys[0].shape == (2, cfg.n_kv_head, 9, cfg.head_dim)
        parts = [model(ids[:, a:b], cache=cache).numpy() for a, b in ((0, 5), (5, 6), (6, 9))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-10, atol=1e-11)


def test_generation_cached_equals_uncached():
    model = GPT(qwen_tiny(n_kv_head=1))
    prompt = np.array([[3, 1, 4, 1, 5]])
    cached = model.generate(prompt, 12, temperature=0.0, use_cache=True)
    plain = model.generate(prompt, 12, temperature=0.0, use_cache=False)
    np.testing.assert_array_equal(cached, plain)


def test_gqa_shrinks_the_kv_cache_by_n_head_over_n_kv_head():
    qwen = GPTConfig.from_preset("qwen3-0.6b")
    without_gqa = dataclasses.replace(qwen, n_kv_head=qwen.n_head)
    gqa_bytes, mha_bytes = qwen.kv_cache_bytes(4096), without_gqa.kv_cache_bytes(4096)
    assert gqa_bytes == 2 * 28 * 8 * 4096 * 128 * 4 == 939_524_096               # fp32, batch 1
    assert mha_bytes / gqa_bytes == qwen.n_head / qwen.n_kv_head == 2
    llama = GPTConfig.from_preset("llama-3.2-1b")
    assert dataclasses.replace(llama, n_kv_head=32).kv_cache_bytes(4096) == 4 * llama.kv_cache_bytes(4096)
    cfg = llama_tiny()                                            # the formula is what a cache allocates
    assert GPT(cfg).new_kv_cache(3, 20).nbytes == cfg.kv_cache_bytes(20, batch=3) == 2 * 2 * 3 * 2 * 20 * 8 * 4


def test_training_lowers_the_loss():
    cfg = llama_tiny(vocab_size=16, context_length=16)
    model = GPT(cfg)
    opt = optim.AdamW(model.parameters(), lr=3e-3)
    ids = np.tile(np.arange(16), (4, 2))[:, :17]                # a sequence the model can learn
    losses = []
    for _ in range(30):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("fields, message", [
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(positions="alibi"), "positions must be one of"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(head_dim=7), "even head_dim"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=2.0)), "unsupported rope scaling type 'yarn'"),
    (dict(positions="learned", rope_scaling=LLAMA3_SCALING), "rope_scaling needs positions='rope'"),
])
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        llama_tiny(**fields)


def test_gpt2_config_round_trips_with_the_new_fields():
    cfg = GPTConfig.from_preset("llama-3.2-1b")
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    old = GPTConfig.from_preset("tiny").to_dict()
    for name in ("positions", "norm", "mlp", "mlp_hidden", "n_kv_head", "head_dim", "qk_norm",
                 "tie_embeddings", "rope_theta", "rope_scaling"):
        del old[name]                                             # a checkpoint written before them
    assert GPTConfig.from_dict(old) == GPTConfig.from_preset("tiny")


def test_llama_style_twin_has_the_same_parameter_count():
    gpt2 = GPTConfig(vocab_size=256, context_length=64, n_layer=4, n_head=4, d_model=128)
    llama = llama_style(gpt2, n_kv_head=2)
    assert (llama.positions, llama.norm, llama.mlp, llama.bias, llama.n_kv_head) == ("rope", "rmsnorm", "swiglu",
                                                                                      False, 2)
    assert gpt_num_parameters(gpt2) == 834_304
    assert abs(GPT(llama).num_parameters() - 834_304) <= 3 * 128 * 4 / 2      # within half a unit of the width
    assert GPTConfig(mlp="swiglu", d_model=128, n_head=4).mlp_hidden == 344    # ⌈8·128/3⌉ to a multiple of 8
