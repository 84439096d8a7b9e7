"""LoRA: starts at the base model, merged == unmerged, trainable count == r·(in+out), gradients, save/load."""

import numpy as np
import pytest

import minillm as mm
from minillm import nn
from minillm.models import GPT, GPTConfig
from minillm.nn.lora import (
    LoRALinear, apply_lora, load_adapters, lora_layers, lora_parameter_count, merge_lora, save_adapters,
    unmerge_lora,
)


def _tiny_gpt():
    return GPT(GPTConfig.from_preset("tiny", n_layer=2, d_model=32, n_head=2, vocab_size=50, context_length=16))


def _randomise_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.data[...] = rng.normal(0, 0.1, layer.lora_B.shape).astype(layer.lora_B.dtype)


def test_lora_linear_is_the_base_until_trained_and_matches_the_formula():
    linear = nn.Linear(6, 4)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    base = linear(mm.Tensor(x)).numpy()
    layer = LoRALinear(linear, rank=2, alpha=8.0)
    assert np.array_equal(layer(mm.Tensor(x)).numpy(), base)           # B = 0: exactly the base model
    assert not np.all(layer.lora_A.data == 0)                           # A random
    layer.lora_B.data[...] = np.arange(8, dtype=np.float32).reshape(4, 2) / 10
    W, b, A, B = (p.data for p in (linear.weight, linear.bias, layer.lora_A, layer.lora_B))
    expected = x @ W.T + b + (8.0 / 2) * (x @ A.T) @ B.T               # plain NumPy formula
    np.testing.assert_allclose(layer(mm.Tensor(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_only_a_and_b_get_gradients_and_they_are_right():
    linear = nn.Linear(5, 3).to(np.float64)
    layer = LoRALinear(linear, rank=2, alpha=4.0)
    layer.lora_B.data[...] = np.random.default_rng(2).normal(size=(3, 2))
    x = mm.Tensor(np.random.default_rng(3).normal(size=(4, 5)))
    mm.gradcheck(lambda a, b: _sum_of_squares(layer, x, a, b), layer.lora_A, layer.lora_B)
    loss = (layer(x) * layer(x)).sum()
    loss.backward()
    assert linear.weight.grad is None and linear.bias.grad is None     # frozen
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def _sum_of_squares(layer, x, a, b):
    layer.lora_A, layer.lora_B = a, b
    y = layer(x)
    return (y * y).sum()


def test_a_starts_as_n_0_one_over_in_and_b_at_zero():
    """docs/finetuning.md: A (r × in) ~ N(0, 1/in), B (out × r) zeros."""
    layer = LoRALinear(nn.Linear(400, 30), rank=16, alpha=16)
    A, B = layer.lora_A.data, layer.lora_B.data
    assert A.shape == (16, 400) and B.shape == (30, 16) and np.all(B == 0)
    std = 1 / np.sqrt(400)                                              # 6,400 draws: std known to ~1%
    assert abs(A.std() - std) < 0.05 * std and abs(A.mean()) < 4 * std / 80


def test_first_step_moves_b_only_and_both_gradients_are_the_derived_ones():
    """docs/finetuning.md: with g = dL/dy, dL/dB = (α/r) gᵀ (x Aᵀ) and dL/dA = (α/r) (g B)ᵀ x, which is 0 while
    B = 0: at the first step B moves, then A. Checked in plain NumPy, α/r = 6 / 2."""
    rng = np.random.default_rng(7)
    layer = LoRALinear(nn.Linear(5, 3).to(np.float64), rank=2, alpha=6.0)
    x, g = rng.normal(size=(4, 5)), rng.normal(size=(4, 3))
    (layer(mm.Tensor(x)) * mm.Tensor(g)).sum().backward()              # dL/dy = g
    A = layer.lora_A.data
    np.testing.assert_array_equal(layer.lora_A.grad, 0.0)
    np.testing.assert_allclose(layer.lora_B.grad, 3.0 * g.T @ (x @ A.T), rtol=1e-12)
    B = rng.normal(size=(3, 2))
    layer.lora_B.data[...] = B
    layer.zero_grad()
    (layer(mm.Tensor(x)) * mm.Tensor(g)).sum().backward()
    np.testing.assert_allclose(layer.lora_A.grad, 3.0 * (g @ B).T @ x, rtol=1e-12)
    np.testing.assert_allclose(layer.lora_B.grad, 3.0 * g.T @ (x @ A.T), rtol=1e-12)


def test_dropout_acts_on_the_adapters_input_only_and_only_in_training():
    """docs/finetuning.md: y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ. With A = B = I the branch is (α/r) dropout(x):
    each entry 0 or x / (1 − p) in training, x in eval; the base term is never dropped."""
    linear = nn.Linear(6, 6).to(np.float64)
    layer = LoRALinear(linear, rank=6, alpha=12.0, dropout=0.5)
    layer.lora_A.data[...] = np.eye(6)
    layer.lora_B.data[...] = np.eye(6)
    x = np.random.default_rng(5).uniform(1, 2, size=(50, 6))
    base = x @ linear.weight.data.T + linear.bias.data
    branch = (layer.train()(mm.Tensor(x)).numpy() - base) / 2.0                   # α/r = 2
    dropped = np.isclose(branch, 0.0, atol=1e-12)
    assert 0.3 < dropped.mean() < 0.7
    np.testing.assert_allclose(branch[~dropped], 2 * x[~dropped], rtol=1e-12)    # kept: x / (1 - p)
    np.testing.assert_allclose((layer.eval()(mm.Tensor(x)).numpy() - base) / 2.0, x, rtol=1e-12)


def test_merged_equals_unmerged_and_unmerge_restores_the_weight():
    model = _tiny_gpt()
    names = apply_lora(model, rank=4, alpha=8)
    assert len(names) == 2 * 4                                            # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    _randomise_adapters(model)
    ids = np.random.default_rng(0).integers(0, 50, (2, 10))
    weight_before = model.h[0].attn.c_attn.weight.data.copy()
    with mm.no_grad():
        unmerged = model(ids).numpy()
        merge_lora(model)
        merged = model(ids).numpy()
    assert not np.array_equal(model.h[0].attn.c_attn.weight.data, weight_before)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-5)
    unmerge_lora(model)
    np.testing.assert_allclose(model.h[0].attn.c_attn.weight.data, weight_before, atol=1e-6)


def test_trainable_count_equals_the_formula():
    model = _tiny_gpt()
    C, r = 32, 4
    apply_lora(model, rank=r, alpha=8)
    per_block = r * (C + 3 * C) + r * (C + C) + r * (C + 4 * C) + r * (4 * C + C)   # r·(in + out) per layer
    assert lora_parameter_count(model) == 2 * per_block
    assert model.num_parameters(trainable_only=True) == 2 * per_block   # everything else frozen
    only_attn = _tiny_gpt()
    apply_lora(only_attn, rank=r, alpha=8, targets=["h.*.attn.c_attn"])
    assert only_attn.num_parameters(trainable_only=True) == 2 * r * (C + 3 * C)


def test_no_match_is_a_clear_error():
    with pytest.raises(ValueError, match="no Linear layer matches"):
        apply_lora(_tiny_gpt(), rank=2, alpha=2, targets=["nothing.*"])


def test_adapters_save_alone_and_load_onto_their_base(tmp_path):
    mm.manual_seed(3)
    base = _tiny_gpt()
    base_state = {k: v.copy() for k, v in base.state_dict().items()}
    apply_lora(base, rank=2, alpha=4, targets=["h.1.*"])
    _randomise_adapters(base, seed=5)
    ids = np.random.default_rng(1).integers(0, 50, (1, 8))
    with mm.no_grad():
        expected = base(ids).numpy()
    path = tmp_path / "adapters.safetensors"
    save_adapters(base, path)
    from minillm.weights import load_file
    stored = load_file(path)
    assert sorted(stored) == sorted(n for n, _ in base.named_parameters() if "lora_" in n)
    assert sum(a.size for a in stored.values()) == lora_parameter_count(base)   # the adapters alone

    mm.manual_seed(99)
    fresh = _tiny_gpt()
    fresh.load_state_dict(base_state)                                   # the base run's weights
    load_adapters(fresh, path)                                          # rebuilds the same LoRA layers
    with mm.no_grad():
        np.testing.assert_allclose(fresh(ids).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert [n for n, _ in lora_layers(fresh)] == [n for n, _ in lora_layers(base)]
