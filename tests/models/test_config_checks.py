"""GPTConfig as a user of the API meets it: every impossible combination is refused naming the field, before
any weight is drawn; every preset's parameter count equals a closed form written here (big presets: the
config only, their shape checked on a shrunken twin that is built)."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.models import GPT, PRESETS, GPTConfig, gpt_num_parameters

ROPE = dict(positions="rope")
SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)


@pytest.mark.parametrize("fields, message", [
    (dict(n_head=-2), "n_head must be a positive integer, got -2"),
    (dict(d_model=0), "d_model must be a positive integer, got 0"),
    (dict(context_length=-1), "context_length must be a positive integer"),
    (dict(vocab_size=True), "vocab_size must be a positive integer, got True"),
    (dict(n_kv_head=0), "n_kv_head must be a positive integer or None, got 0"),
    (dict(head_dim=-4), "head_dim must be a positive integer or None"),
    (dict(mlp_hidden=0), "mlp_hidden must be a positive integer or None"),
    (dict(n_kv_head=8), "n_kv_head=8 must divide n_head=12"),
    (dict(d_model=100, n_head=12), "d_model=100 must be divisible by n_head=12"),
    (dict(dropout=-0.01), "dropout must be a probability in \\[0, 1\\)"),
    (dict(dropout=float("nan")), "dropout must be a probability"),
    (dict(layer_norm_eps=True), "layer_norm_eps must be a positive number, got True"),
    (dict(layer_norm_eps=math.inf), "layer_norm_eps must be a positive number, got inf"),
    (dict(ROPE, head_dim=7), "rotary positions need an even head_dim, got 7"),
    (dict(ROPE, d_model=36, n_head=4), "rotary positions need an even head_dim, got 9"),
    (dict(ROPE, rope_theta=True), "rope_theta must be a positive number, got True"),
    (dict(ROPE, rope_theta=math.inf), "rope_theta must be a positive number, got inf"),
    (dict(ROPE, rope_theta=-1.0), "rope_theta must be a positive number"),
    (dict(ROPE, rope_scaling=[8.0]), "rope_scaling must be a dict"),
    (dict(ROPE, rope_scaling={**SCALING, "factor": 0.0}), "rope_scaling: .*factor > 0"),
    (dict(ROPE, rope_scaling={"rope_type": "llama3", "factor": 2.0}), "rope_scaling: .*low_freq_factor"),
    (dict(rope_scaling=SCALING), "rope_scaling needs positions='rope'"),
    (dict(norm="LayerNorm"), "norm must be one of 'layernorm', 'rmsnorm'"),
    (dict(mlp="geglu"), "mlp must be one of"),
    (dict(positions="absolute"), "positions must be one of 'learned', 'rope'"),
    (dict(qk_norm="yes"), "qk_norm must be True or False"),
])
def test_impossible_configs_name_the_field(fields, message):
    """Each is refused by GPTConfig itself, so before GPT (which takes only a GPTConfig) draws a weight."""
    with pytest.raises(ValueError, match="GPTConfig: " + message):
        GPTConfig(**fields)


@settings(max_examples=40, deadline=None)
@given(n_head=st.integers(1, 12), n_kv_head=st.integers(1, 12), d_model=st.integers(1, 96),
       head_dim=st.one_of(st.none(), st.integers(1, 17)), rope=st.booleans())
def test_head_arithmetic_is_accepted_exactly_when_possible(n_head, n_kv_head, d_model, head_dim, rope):
    """The three head rules, as a predicate written here, decide acceptance; a refusal names its rule."""
    effective_dim = d_model // n_head if head_dim is None else head_dim
    problems = []
    if head_dim is None and d_model % n_head:
        problems.append("must be divisible by n_head")
    elif n_head % n_kv_head:
        problems.append("must divide n_head")
    elif rope and effective_dim % 2:
        problems.append("even head_dim")
    fields = dict(vocab_size=11, context_length=8, n_layer=1, n_head=n_head, n_kv_head=n_kv_head, d_model=d_model,
                  head_dim=head_dim, positions="rope" if rope else "learned")
    if problems:
        with pytest.raises(ValueError, match=problems[0]):
            GPTConfig(**fields)
    else:
        cfg = GPTConfig(**fields)
        assert (cfg.head_dim, cfg.n_kv_head) == (effective_dim, n_kv_head)


def closed_form(cfg: GPTConfig) -> int:
    """Parameters counted per tensor, written out independently of gpt_num_parameters."""
    C, V, L, H, K, D = cfg.d_model, cfg.vocab_size, cfg.context_length, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    b = int(cfg.bias)
    inner = cfg.mlp_hidden if cfg.mlp_hidden is not None else 4 * C
    norm = C + (b * C if cfg.norm == "layernorm" else 0)                # RMSNorm never has a bias
    q, kv = H * D, K * D
    attn = (C * (q + 2 * kv) + b * (q + 2 * kv)) + (q * C + b * C) + (2 * D if cfg.qk_norm else 0)
    if cfg.mlp == "swiglu":
        mlp = 2 * (C * inner + b * inner) + (inner * C + b * C)          # gate, up, down
    else:
        mlp = (C * inner + b * inner) + (inner * C + b * C)
    embeddings = V * C + (0 if cfg.tie_embeddings else V * C) + (L * C if cfg.positions == "learned" else 0)
    return embeddings + cfg.n_layer * (attn + mlp + 2 * norm) + norm


def shrunk(cfg: GPTConfig) -> GPTConfig:
    """The same structure (norm, mlp, positions, heads, kv heads, qk norm, tying, rope) at a buildable size."""
    return dataclasses.replace(cfg, vocab_size=37, context_length=16, n_layer=2, d_model=24,
                               head_dim=min(cfg.head_dim, 8), mlp_hidden=None if cfg.mlp_hidden is None else 20)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_count_is_the_closed_form_and_its_twin_builds(name):
    cfg = GPTConfig.from_preset(name)
    assert gpt_num_parameters(cfg) == closed_form(cfg)
    small = shrunk(cfg)
    model = GPT(small)
    assert model.num_parameters() == closed_form(small) == sum(p.data.size for p in model.parameters())
    logits = model(np.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 37) and np.isfinite(logits.numpy()).all()


def test_preset_counts_by_hand():
    """Published sizes (GPT-2 papers' table / the Hugging Face model cards) as independent anchors."""
    counts = {name: closed_form(GPTConfig.from_preset(name)) for name in PRESETS}
    assert counts["gpt2-xl"] == 1_557_611_200 and counts["gpt2-124m"] == 124_439_808
    assert counts["llama-3.2-1b"] == 1_235_814_400 and counts["qwen3-0.6b"] == 596_049_920


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_built_models_have_the_closed_form_count(data):
    """Any small combination of the modern options: the built model's tensors add up to the closed form."""
    n_kv = data.draw(st.sampled_from([1, 2, 4]))
    rope = data.draw(st.booleans())
    cfg = GPTConfig(vocab_size=data.draw(st.integers(2, 40)), context_length=data.draw(st.integers(1, 20)),
                    n_layer=data.draw(st.integers(1, 3)), n_head=4, n_kv_head=n_kv, d_model=16,
                    head_dim=data.draw(st.sampled_from([None, 2, 6])), bias=data.draw(st.booleans()),
                    norm=data.draw(st.sampled_from(["layernorm", "rmsnorm"])),
                    mlp=data.draw(st.sampled_from(["gelu", "swiglu"])),
                    mlp_hidden=data.draw(st.sampled_from([None, 5])), qk_norm=data.draw(st.booleans()),
                    tie_embeddings=data.draw(st.booleans()), positions="rope" if rope else "learned")
    model = GPT(cfg)
    assert sum(p.data.size for p in model.parameters()) == closed_form(cfg) == gpt_num_parameters(cfg)
