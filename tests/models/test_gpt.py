"""GPTConfig and GPT: presets, names, parameter count, init, forward vs NumPy, gradients, errors, dropout."""

import inspect
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import minillm as mm
from minillm.backend import to_numpy
from minillm.models import GPT, GPTConfig, gpt_num_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
import nn_numpy_reference as ref  # noqa: E402


def tiny(**overrides):
    return GPTConfig.from_preset("tiny", **overrides)


def numpy_state(model):
    return {name: to_numpy(array) for name, array in model.state_dict().items()}


def random_ids(config, shape, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


# ------------------------------------------------------------------ config


def test_config_defaults_are_gpt2_small():
    cfg = GPTConfig()
    assert (cfg.vocab_size, cfg.context_length, cfg.n_layer, cfg.n_head, cfg.d_model) == (50257, 1024, 12, 12, 768)
    assert (cfg.dropout, cfg.bias, cfg.layer_norm_eps, cfg.head_dim) == (0.0, True, 1e-5, 64)


@pytest.mark.parametrize("name, layers, heads, width", [
    ("gpt2-124m", 12, 12, 768), ("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280),
    ("gpt2-xl", 48, 25, 1600), ("gpt2", 12, 12, 768),
])
def test_presets_have_gpt2_sizes(name, layers, heads, width):
    cfg = GPTConfig.from_preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.vocab_size, cfg.context_length) == (layers, heads, width, 50257, 1024)


def test_from_preset_overrides_and_round_trip():
    cfg = tiny(vocab_size=65, dropout=0.1)
    assert cfg.vocab_size == 65 and cfg.dropout == 0.1 and cfg.n_layer == 2
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*'tiny'"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="unknown field\\(s\\) n_embd"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


@pytest.mark.parametrize("fields, message", [
    (dict(d_model=30, n_head=4), "d_model=30 must be divisible by n_head=4"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
    (dict(dropout=1.0), "dropout must be a probability"),
    (dict(layer_norm_eps=0), "layer_norm_eps must be a positive number"),
    (dict(bias="yes"), "bias must be True or False"),
    (dict(gelu_approximate="fast"), "gelu_approximate"),
])
def test_config_validation_messages(fields, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**fields)


# ------------------------------------------------------------------ structure, count, init


def test_parameter_names_are_gpt2_checkpoint_names():
    names = list(GPT(tiny()).state_dict())
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = ["wte.weight", "wpe.weight"] + [f"h.{i}.{n}" for i in range(2) for n in block] + ["ln_f.weight", "ln_f.bias"]
    assert names == expected                                      # no lm_head: the head is tied to wte


def formula(cfg):
    """Parameter count written out independently: embeddings, per-layer pieces, final norm."""
    C, V = cfg.d_model, cfg.vocab_size
    b = 1 if cfg.bias else 0
    attention = (C * 3 * C + b * 3 * C) + (C * C + b * C)
    mlp = (C * 4 * C + b * 4 * C) + (4 * C * C + b * C)
    norms = 2 * (C + b * C)
    return V * C + cfg.context_length * C + cfg.n_layer * (attention + mlp + norms) + (C + b * C)


@pytest.mark.parametrize("bias", [True, False])
def test_num_parameters_matches_formula(bias):
    cfg = tiny(bias=bias, n_layer=3)
    assert GPT(cfg).num_parameters() == formula(cfg) == gpt_num_parameters(cfg)


def test_gpt2_124m_has_124_439_808_parameters():
    cfg = GPTConfig.from_preset("gpt2-124m")
    assert formula(cfg) == gpt_num_parameters(cfg) == 124_439_808
    model = GPT(cfg)                                               # ~500 MB of float32, once
    assert model.num_parameters() == 124_439_808
    assert model.wte.weight.shape == (50257, 768) and model.h[11].mlp.c_fc.weight.shape == (3072, 768)


@pytest.mark.parametrize("preset, count", [
    ("tiny", 35_712), ("gpt2-124m", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_preset_table_of_docs_model_md(preset, count):
    """The parameter column of docs/model.md's preset table: GPT-2's published sizes (tied head)."""
    cfg = GPTConfig.from_preset(preset)
    assert gpt_num_parameters(cfg) == formula(cfg) == count


def test_gpt2_init_statistics():
    mm.manual_seed(0)
    cfg = GPTConfig(vocab_size=500, context_length=64, n_layer=8, n_head=4, d_model=128)
    sd = numpy_state(GPT(cfg))
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name, array in sd.items():
        if name.endswith("c_proj.weight"):
            assert abs(array.std() - residual_std) < 0.1 * residual_std, name
        elif array.ndim == 2:
            assert abs(array.std() - 0.02) < 0.1 * 0.02, name
        elif "ln" in name and name.endswith("weight"):
            np.testing.assert_array_equal(array, 1.0)
        else:
            np.testing.assert_array_equal(array, 0.0)                # every bias
    assert all(array.dtype == np.float32 for array in sd.values())


def test_same_seed_same_model_different_seed_different(device):
    mm.manual_seed(5)
    a = numpy_state(GPT(tiny()))
    mm.manual_seed(5)
    b = numpy_state(GPT(tiny(), device=device))                    # drawn on the CPU, moved to the device
    mm.manual_seed(6)
    c = numpy_state(GPT(tiny()))
    mm.manual_seed(5)
    d = numpy_state(GPT(tiny(), dtype=np.float64))                 # drawn in float32, then cast
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], d[k]) for k in a)
    assert d["wte.weight"].dtype == np.float64
    assert not np.array_equal(a["wte.weight"], c["wte.weight"])


def test_repr_shows_structure():
    text = repr(GPT(tiny()))
    assert text.startswith("GPT(\n  35,712 parameters\n  (wte): Embedding(256, 32)\n  (wpe): Embedding(64, 32)")
    assert "(0-1): 2 x TransformerBlock(" in text and "(c_attn): Linear(in_features=32, out_features=96, bias=True)" in text


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_forward_matches_numpy_reference(device, approximate):
    # "tanh" is not passed: docs/model.md promises GPT-2's tanh GELU as the default MLP
    cfg = tiny() if approximate == "tanh" else tiny(gelu_approximate="none")
    model = GPT(cfg).to(device, dtype=np.float64)
    rng = np.random.default_rng(1)
    state = {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in numpy_state(model).items()}
    model.load_state_dict(state)                                   # weights away from init, biases non-zero
    ids = random_ids(cfg, (2, 9))
    logits = model(ids)
    assert logits.shape == (2, 9, cfg.vocab_size) and logits.dtype == np.float64
    expected = ref.gpt_logits(ids, state, cfg.n_layer, cfg.n_head, approximate=approximate)
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-9, atol=1e-10)


def test_loss_convention_and_value(device):
    cfg = tiny()
    model = GPT(cfg).to(device)
    ids, targets = random_ids(cfg, (3, 10), seed=1), random_ids(cfg, (3, 10), seed=2)
    targets[0, :4] = -100                                          # ignored positions
    logits, loss = model(ids, targets)
    assert loss.shape == () and isinstance(model(ids), mm.Tensor)
    expected = ref.cross_entropy(logits.numpy().astype(np.float64), targets)
    assert abs(loss.item() - expected) < 1e-5
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.05     # at init the model is near uniform


def test_accepts_tensor_and_list_ids():
    model = GPT(tiny())
    ids = [[1, 2, 3]]
    np.testing.assert_array_equal(model(ids).numpy(), model(mm.Tensor(np.array(ids))).numpy())


@pytest.mark.parametrize("ids, error, message", [
    (np.zeros((1, 4), dtype=np.float32), TypeError, "token ids must be integers"),
    (np.zeros(4, dtype=np.int64), ValueError, r"shape \(batch, time\).*ids\[None\]"),
    (np.zeros((1, 65), dtype=np.int64), ValueError, "sequence length 65 .*context_length=64"),
    (np.full((1, 4), 256), IndexError, "256 is out of range"),
    (np.full((1, 4), -1), IndexError, "-1 is out of range"),
])
def test_input_errors(ids, error, message):
    with pytest.raises(error, match=message):
        GPT(tiny())(ids)


# ------------------------------------------------------------------ gradients of the whole model


def test_whole_model_gradcheck_logits():
    cfg = tiny()
    model = GPT(cfg).to(dtype=np.float64)
    ids = random_ids(cfg, (2, 5))
    params = [model.h[0].ln_1.weight, model.h[1].attn.c_proj.bias, model.wte.weight, model.h[0].attn.c_attn.weight]
    assert mm.gradcheck(lambda *p: model(ids), *params)


def test_whole_model_gradcheck_loss_with_dropout():
    cfg = tiny(dropout=0.1)
    model = GPT(cfg).to(dtype=np.float64).train()
    ids, targets = random_ids(cfg, (2, 6), seed=3), random_ids(cfg, (2, 6), seed=4)

    def loss(*params):
        mm.manual_seed(11)                                         # identical dropout masks on every call
        return model(ids, targets)[1]

    params = [model.wpe.weight, model.h[1].mlp.c_fc.bias, model.ln_f.weight, model.h[0].mlp.c_proj.weight]
    assert mm.gradcheck(loss, *params)


def test_tied_head_gradient_includes_both_uses(monkeypatch):
    """d loss / d wte = head part + lookup part, each worked out by hand in NumPy:

        head:   logits = x Wᵀ, loss = mean CE  ->  dW = dlogitsᵀ x,  dlogits = (softmax − onehot) / N
        lookup: h0[t] = W[ids[t]] + wpe[t]    ->  dW[v] = Σ_{t: ids[t] = v} dh0[t],  dh0[t] = d wpe[t]

    (one sequence, so wpe's gradient row t is exactly dh0[t]). x, the final hidden states, is what
    the head is given, recorded on its way in."""
    cfg = tiny()
    model = GPT(cfg).to(dtype=np.float64)
    ids = np.array([[5, 9, 5, 200, 9, 5]])                         # repeats: the lookup part adds up rows
    targets = random_ids(cfg, (1, 6), seed=1)
    head_inputs = []
    real_linear = mm.functional.linear

    def recording_linear(x, weight, *args, **kwargs):
        if weight is model.wte.weight:
            head_inputs.append(to_numpy(x.data).copy())
        return real_linear(x, weight, *args, **kwargs)

    monkeypatch.setattr(mm.functional, "linear", recording_linear)
    model(ids, targets)[1].backward()
    (x,) = head_inputs                                               # (1, T, C): the head ran once, on wte
    W = to_numpy(model.wte.weight.data)                              # (V, C)
    logits = x[0] @ W.T                                              # (T, V)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dlogits = (probs - np.eye(cfg.vocab_size)[targets[0]]) / targets.size
    head_part = dlogits.T @ x[0]                                     # (V, C)
    lookup_part = np.zeros_like(W)
    np.add.at(lookup_part, ids[0], to_numpy(model.wpe.weight.grad)[:ids.shape[1]])
    grad = to_numpy(model.wte.weight.grad)
    np.testing.assert_allclose(grad, head_part + lookup_part, rtol=1e-9, atol=1e-13)
    for part in (head_part, lookup_part):                            # each use matters: dropping one would show
        assert np.abs(part).max() > 0.01 * np.abs(grad).max()
    unused = np.setdiff1d(np.arange(cfg.vocab_size), ids)
    assert np.abs(grad[unused]).max() > 0                          # rows never looked up still learn (head)


# ------------------------------------------------------------------ dropout, train/eval


def test_dropout_train_vs_eval():
    cfg = tiny(dropout=0.2)
    mm.manual_seed(0)
    model = GPT(cfg)
    mm.manual_seed(0)
    reference = GPT(tiny())                                        # same weights, no dropout
    ids = random_ids(cfg, (2, 8))
    assert not np.allclose(model(ids).numpy(), model(ids).numpy())  # training: fresh masks each call
    model.eval()
    np.testing.assert_array_equal(model(ids).numpy(), reference(ids).numpy())


def test_generate_is_a_method_with_the_fixed_signature():
    params = list(inspect.signature(GPT.generate).parameters)
    assert params == ["self", "ids", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "seed", "use_cache"]

