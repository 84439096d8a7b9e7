"""Every layer of ``minillm.nn``, in each of its configurations, differentiated with respect to its
input AND every trainable parameter: against float64 central differences (``mm.gradcheck``) and
against the same module run on the composed-from-primitives ops (F.layer_norm -> layer_norm_composed,
attention, gelu, rms_norm, rope, swiglu: every fused op swapped for its composition).

Layers hold no backward of their own, so this checks that the compositions wire the ops right
(which parameter reaches which op, GQA's split of the packed projection, qk-norm before rope,
LoRA's frozen base): a parameter a layer forgot to use, or used twice, shows here.
Input shapes (B, T) are drawn by Hypothesis.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import minillm as mm
from minillm import functional as F
from minillm import nn

SETTINGS = settings(max_examples=3, deadline=None, derandomize=True,   # monkeypatch is used as a context:
                    suppress_health_check=[HealthCheck.function_scoped_fixture])   # nothing kept between examples

LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8}

# name -> (make the module (float64), whether its input is token ids, the model width)
MODULES = {
    "linear": (lambda: nn.Linear(4, 3, init_std=0.5), False, 4),
    "linear_no_bias": (lambda: nn.Linear(4, 3, bias=False, init_std=0.5), False, 4),
    "embedding": (lambda: nn.Embedding(5, 3), True, 5),
    "layer_norm": (lambda: nn.LayerNorm(4), False, 4),
    "layer_norm_no_bias": (lambda: nn.LayerNorm(4, bias=False), False, 4),
    "rms_norm": (lambda: nn.RMSNorm(4), False, 4),
    "gelu": (lambda: nn.GELU(), False, 4),
    "gelu_exact": (lambda: nn.GELU(approximate="none"), False, 4),
    "dropout": (lambda: nn.Dropout(0.4), False, 4),
    "sequential": (lambda: nn.Sequential(nn.Linear(4, 6, init_std=0.5), nn.GELU(), nn.Linear(6, 4, init_std=0.5)),
                   False, 4),
    "feed_forward_gelu": (lambda: nn.FeedForward(4, 6, dropout=0.2, init_std=0.5), False, 4),
    "feed_forward_swiglu": (lambda: nn.FeedForward(4, 6, activation="swiglu", bias=False, init_std=0.5), False, 4),
    "attention": (lambda: nn.MultiHeadAttention(6, 2, init_std=0.5), False, 6),
    "attention_dropout": (lambda: nn.MultiHeadAttention(6, 2, dropout=0.3, init_std=0.5), False, 6),
    "attention_gqa_rope": (lambda: nn.MultiHeadAttention(8, 4, n_kv_head=2, bias=False, rope_theta=100.0,
                                                         init_std=0.5), False, 8),
    "attention_qwen3": (lambda: nn.MultiHeadAttention(6, 3, n_kv_head=1, head_dim=4, qk_norm=True,
                                                      rope_theta=1000.0, rope_scaling=LLAMA3_SCALING,
                                                      init_std=0.5), False, 6),
    "block_gpt2": (lambda: nn.TransformerBlock(4, 2, dropout=0.2, init_std=0.5), False, 4),
    "block_llama": (lambda: nn.TransformerBlock(8, 4, bias=False, norm="rmsnorm", activation="swiglu",
                                                hidden=6, n_kv_head=2, rope_theta=500.0, init_std=0.5), False, 8),
    "block_qwen3": (lambda: nn.TransformerBlock(4, 2, bias=False, norm="rmsnorm", activation="swiglu", hidden=4,
                                                n_kv_head=1, head_dim=6, qk_norm=True, rope_theta=100.0,
                                                init_std=0.5), False, 4),
    "lora": (lambda: _lora(), False, 4),
}


def _lora():
    layer = nn.LoRALinear(nn.Linear(4, 3, init_std=0.5), rank=2, alpha=4.0, dropout=0.25)
    layer.lora_B.data[...] = np.random.default_rng(1).standard_normal(layer.lora_B.shape)   # B = 0 at the start
    return layer


def build(name):
    make, takes_ids, width = MODULES[name]
    mm.manual_seed(0)
    module = make().to(dtype=np.float64)
    module.train()
    for p in module.parameters():                            # norms start at w = 1, b = 0: move them
        if p.requires_grad and p.ndim == 1:
            p.data[...] = p.data + np.random.default_rng(p.size).standard_normal(p.shape) * 0.3
    return module, takes_ids, width


def inputs_for(data, takes_ids, width):
    batch, time = data.draw(st.integers(1, 2), label="batch"), data.draw(st.integers(1, 4), label="time")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    if takes_ids:
        return rng.integers(0, width, (batch, time)), None
    return None, rng.standard_normal((batch, time, width))


def run(module, ids, x_values):
    def forward(x, *params):
        mm.manual_seed(9)                                    # the same dropout masks on every call
        return module(ids if ids is not None else x)
    x = None if x_values is None else mm.Tensor(x_values, requires_grad=True)
    return forward, x


COMPOSED = {"layer_norm": F.layer_norm_composed, "rms_norm": F.rms_norm_composed, "gelu": F.gelu_composed,
            "scaled_dot_product_attention": F.scaled_dot_product_attention_composed,
            "rope": F.rope_composed, "swiglu": F.swiglu_composed, "softmax": F.softmax_composed,
            "log_softmax": F.log_softmax_composed, "cross_entropy": F.cross_entropy_composed}


@pytest.mark.parametrize("name", sorted(MODULES))
@SETTINGS
@given(data=st.data())
def test_module_gradients_against_central_differences_and_composed_ops(name, data, monkeypatch):
    module, takes_ids, width = build(name)
    ids, x_values = inputs_for(data, takes_ids, width)
    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    forward, x = run(module, ids, x_values)
    inputs = ([x] if x is not None else []) + trainable
    if x is None:
        mm.gradcheck(lambda *params: forward(None, *params), *trainable)
    else:
        mm.gradcheck(forward, *inputs)

    # the fused run and the composed run: same values, same gradients for x and every parameter
    v = np.random.default_rng(3).standard_normal(forward(x, *trainable).shape)
    results = []
    for swap in (False, True):
        with monkeypatch.context() as patch:
            if swap:
                for op, composed in COMPOSED.items():
                    patch.setattr(F, op, composed)
            for t in inputs:
                t.grad = None
            out = forward(x, *trainable)
            out.backward(v)
            results.append((out.numpy(), [np.array(t.grad) if t.grad is not None else np.zeros(t.shape)
                                          for t in inputs]))
    (fused_out, fused_grads), (composed_out, composed_grads) = results
    np.testing.assert_allclose(fused_out, composed_out, rtol=1e-10, atol=1e-12)
    for i, (a, b) in enumerate(zip(fused_grads, composed_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11, err_msg=f"{name}: input {i}")
    for p in frozen:                                          # LoRA's base: no gradient at all
        assert p.grad is None


def test_every_layer_is_covered():
    """A new layer class in nn gets a configuration above."""
    layer_classes = {getattr(nn, n) for n in nn.__all__ if isinstance(getattr(nn, n), type)
                     and issubclass(getattr(nn, n), nn.Module) and getattr(nn, n) is not nn.Module}
    covered = set()
    for make, _, _ in MODULES.values():
        mm.manual_seed(0)
        covered |= {type(m) for m in make().modules()}
    containers = {nn.ModuleList}                              # no forward of its own
    assert layer_classes - containers <= covered, sorted(c.__name__ for c in layer_classes - containers - covered)


def test_shared_parameter_gets_the_gradient_of_both_uses():
    """One Linear applied twice (weight tying): its gradient is the sum over both uses, by gradcheck."""
    layer = nn.Linear(3, 3, init_std=0.5).to(dtype=np.float64)
    model = nn.Sequential(layer, nn.GELU(), layer)
    x = mm.Tensor(np.random.default_rng(4).standard_normal((2, 3)), requires_grad=True)
    assert len(list(model.parameters())) == 2
    mm.gradcheck(lambda x_, w, b: model(x_), x, layer.weight, layer.bias)
