"""Layers against plain-NumPy formulas (float64), their gradients by gradcheck, dropout modes, containers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm as mm
from minillm import nn
from minillm.backend import to_numpy

import nn_numpy_reference as ref


def float64_tensor(shape, device, seed=0, requires_grad=False, scale=1.0):
    data = np.random.default_rng(seed).standard_normal(shape) * scale
    return mm.Tensor(data, requires_grad=requires_grad, device=device)


def numpy_state(module):
    return {name: to_numpy(array) for name, array in module.state_dict().items()}


# ------------------------------------------------------------------ basic layers


def test_linear_matches_numpy_and_shapes(device):
    layer = nn.Linear(5, 3).to(device, dtype=np.float64)
    assert layer.weight.shape == (3, 5) and layer.bias.shape == (3,)
    x = float64_tensor((2, 4, 5), device)
    sd = numpy_state(layer)
    np.testing.assert_allclose(layer(x).numpy(), ref.linear(x.numpy(), sd["weight"], sd["bias"]), rtol=1e-12)
    no_bias = nn.Linear(5, 3, bias=False).to(device, dtype=np.float64)
    np.testing.assert_allclose(no_bias(x).numpy(), x.numpy() @ to_numpy(no_bias.weight.data).T, rtol=1e-12)


def test_linear_default_init_scale():
    layer = nn.Linear(400, 300)
    w = to_numpy(layer.weight.data)
    assert abs(w.std() - 1 / math.sqrt(400)) < 0.002 and abs(w.mean()) < 0.002
    np.testing.assert_array_equal(to_numpy(layer.bias.data), 0.0)
    assert nn.Linear(4, 4, init_std=0.0).weight.numpy().max() == 0.0


def test_embedding_looks_up_rows(device):
    layer = nn.Embedding(10, 4).to(device)
    ids = np.array([[1, 9, 1], [0, 3, 2]])
    np.testing.assert_array_equal(layer(ids).numpy(), to_numpy(layer.weight.data)[ids])
    with pytest.raises(IndexError):
        layer(np.array([10]))


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_numpy(device, bias):
    layer = nn.LayerNorm(6, eps=1e-5, bias=bias).to(device, dtype=np.float64)
    np.testing.assert_array_equal(layer.weight.numpy(), 1.0)
    layer.weight.data[...] = layer.weight.data * 1.5       # non-trivial scale and shift
    if bias:
        layer.bias.data[...] = 0.25
    x = float64_tensor((3, 4, 6), device, scale=3.0)
    sd = numpy_state(layer)
    expected = ref.layer_norm(x.numpy(), sd["weight"], sd.get("bias"), 1e-5)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_numpy(device, approximate):
    x = float64_tensor((50,), device, scale=3.0)
    np.testing.assert_allclose(nn.GELU(approximate)(x).numpy(), ref.gelu(x.numpy(), approximate), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("fast")


# ------------------------------------------------------------------ dropout


def test_dropout_is_identity_in_eval_and_with_p_zero(device):
    x = float64_tensor((100,), device)
    drop = nn.Dropout(0.5).eval()
    assert drop(x) is x
    assert nn.Dropout(0.0)(x) is x


def test_dropout_in_training_zeroes_and_rescales(device):
    x = mm.Tensor(np.ones((200, 100), dtype=np.float32), device=device)
    out = nn.Dropout(0.25)(x).numpy()
    kept = out != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)     # E[out] = x


@pytest.mark.parametrize("p", [-0.1, 1.0, "0.5"])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="Dropout"):
        nn.Dropout(p)


# ------------------------------------------------------------------ containers


def test_sequential_chains_and_indexes():
    seq = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    assert len(seq) == 3 and isinstance(seq[1], nn.GELU) and isinstance(seq[-1], nn.Linear)
    x = mm.Tensor(np.ones((2, 3), dtype=np.float32))
    np.testing.assert_array_equal(seq(x).numpy(), seq[2](seq[1](seq[0](x))).numpy())


def test_module_list_registers_and_slices():
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    layers.append(nn.Linear(2, 1))
    assert len(layers) == 4 and [n for n, _ in layers.named_parameters()][-2:] == ["3.weight", "3.bias"]
    assert isinstance(layers[1:3], nn.ModuleList) and len(layers[1:3]) == 2
    assert list(layers)[0] is layers[0]


# ------------------------------------------------------------------ transformer layers


def test_feed_forward_matches_numpy(device):
    mlp = nn.FeedForward(8, dropout=0.1).to(device, dtype=np.float64).eval()
    assert [n for n, _ in mlp.named_children()] == ["c_fc", "gelu", "c_proj", "dropout"]
    assert mlp.c_fc.weight.shape == (32, 8)
    x = float64_tensor((2, 3, 8), device)
    sd = numpy_state(mlp)
    hidden = ref.gelu(ref.linear(x.numpy(), sd["c_fc.weight"], sd["c_fc.bias"]))
    expected = ref.linear(hidden, sd["c_proj.weight"], sd["c_proj.bias"])
    np.testing.assert_allclose(mlp(x).numpy(), expected, rtol=1e-10, atol=1e-13)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), time=st.integers(1, 7), n_head=st.integers(1, 3), head_dim=st.integers(1, 4),
       bias=st.booleans())
def test_attention_matches_numpy(batch, time, n_head, head_dim, bias):
    mm.manual_seed(batch * 100 + time)
    d_model = n_head * head_dim
    attn = nn.MultiHeadAttention(d_model, n_head, bias=bias, init_std=0.5).to(dtype=np.float64)
    x = float64_tensor((batch, time, d_model), "cpu", seed=time)
    sd = numpy_state(attn)
    expected = ref.causal_attention(x.numpy(), sd["c_attn.weight"], sd.get("c_attn.bias"),
                                    sd["c_proj.weight"], sd.get("c_proj.bias"), n_head)
    np.testing.assert_allclose(attn(x).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_attention_on_device_matches_numpy(device):
    attn = nn.MultiHeadAttention(12, 3, init_std=0.5).to(device, dtype=np.float64)
    x = float64_tensor((2, 5, 12), device)
    sd = numpy_state(attn)
    expected = ref.causal_attention(x.numpy(), sd["c_attn.weight"], sd["c_attn.bias"],
                                    sd["c_proj.weight"], sd["c_proj.bias"], 3)
    np.testing.assert_allclose(attn(x).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_attention_is_causal():
    attn = nn.MultiHeadAttention(8, 2, init_std=0.5).to(dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, 6, 8))
    changed = x.copy()
    changed[0, 4:] += 10.0                                    # perturb the future only
    before, after = attn(mm.Tensor(x)).numpy(), attn(mm.Tensor(changed)).numpy()
    np.testing.assert_array_equal(before[0, :4], after[0, :4])
    assert not np.allclose(before[0, 4:], after[0, 4:])


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not divisible"):
        nn.MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match=r"expected input \(B, T, 8\)"):
        nn.MultiHeadAttention(8, 2)(mm.Tensor(np.zeros((2, 8), dtype=np.float32)))
    with pytest.raises(ValueError, match="head size must be even and positive, got 3"):
        nn.MultiHeadAttention(6, 2, rope_theta=10_000.0)        # found at construction, not at the first forward
    nn.MultiHeadAttention(6, 2)                                 # odd heads without rope are fine


def test_attention_dropout_only_in_training():
    attn = nn.MultiHeadAttention(8, 2, dropout=0.5, init_std=0.5)
    x = mm.Tensor(np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float32))
    mm.manual_seed(3)
    first = attn(x).numpy()
    mm.manual_seed(3)
    np.testing.assert_array_equal(attn(x).numpy(), first)     # reproducible with a seed
    assert not np.allclose(attn(x).numpy(), first)            # a new draw differs
    attn.eval()
    np.testing.assert_array_equal(attn(x).numpy(), attn(x).numpy())
    assert not np.allclose(attn(x).numpy(), first)


def test_transformer_block_matches_numpy(device):
    block = nn.TransformerBlock(12, 3, layer_norm_eps=1e-5, init_std=0.3).to(device, dtype=np.float64)
    assert [n for n, _ in block.named_children()] == ["ln_1", "attn", "ln_2", "mlp"]
    block.ln_1.weight.data[...] = 0.7                        # make the norms non-trivial
    block.ln_2.bias.data[...] = -0.1
    x = float64_tensor((2, 5, 12), device)
    expected = ref.block(x.numpy(), numpy_state(block), "", n_head=3)
    np.testing.assert_allclose(block(x).numpy(), expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ gradients (float64 central differences)


def test_linear_and_layer_norm_gradients():
    linear = nn.Linear(4, 3).to(dtype=np.float64)
    norm = nn.LayerNorm(3).to(dtype=np.float64)
    x = float64_tensor((2, 4), "cpu", requires_grad=True)
    assert mm.gradcheck(lambda x, w, b, g: norm(linear(x)), x, linear.weight, linear.bias, norm.weight)


def test_attention_gradients():
    attn = nn.MultiHeadAttention(6, 2, init_std=0.4).to(dtype=np.float64)
    x = float64_tensor((2, 4, 6), "cpu", requires_grad=True)
    assert mm.gradcheck(lambda x, w, b: attn(x), x, attn.c_attn.weight, attn.c_proj.bias)


def test_block_gradients_with_dropout():
    block = nn.TransformerBlock(6, 2, dropout=0.2, init_std=0.4).to(dtype=np.float64)
    x = float64_tensor((1, 4, 6), "cpu", requires_grad=True)

    def forward(x, *params):
        mm.manual_seed(7)                                      # same dropout masks every call
        return block(x)

    assert mm.gradcheck(forward, x, block.ln_1.weight, block.mlp.c_fc.weight, block.attn.c_attn.bias)
