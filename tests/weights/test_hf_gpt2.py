"""GPT-2 checkpoints in the Hugging Face layout: a hand-built directory, round trips, and errors."""

import json

import numpy as np
import pytest

import minillm as mm
from minillm.models import GPT, GPTConfig
from minillm.weights import load_hf_gpt2, save_hf_gpt2
from minillm.weights.safetensors import load_file, load_metadata, save_file

V, L, C, H, N_LAYER, EPS = 13, 8, 8, 2, 2, 1e-5


def hf_config(**overrides):
    config = {"model_type": "gpt2", "activation_function": "gelu_new", "vocab_size": V, "n_positions": L,
              "n_ctx": L, "n_embd": C, "n_layer": N_LAYER, "n_head": H, "n_inner": None,
              "layer_norm_epsilon": EPS, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
    config.update(overrides)
    return config


def hf_tensors(seed=0, prefix="transformer."):
    """GPT-2 tensors exactly as Hugging Face stores them: Conv1D weights (in, out), plus the buffers."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {f"{prefix}wte.weight": normal(V, C), f"{prefix}wpe.weight": normal(L, C)}
    for i in range(N_LAYER):
        p = f"{prefix}h.{i}."
        t.update({
            p + "ln_1.weight": 1 + normal(C, scale=0.1), p + "ln_1.bias": normal(C, scale=0.1),
            p + "attn.c_attn.weight": normal(C, 3 * C), p + "attn.c_attn.bias": normal(3 * C, scale=0.1),
            p + "attn.c_proj.weight": normal(C, C), p + "attn.c_proj.bias": normal(C, scale=0.1),
            p + "ln_2.weight": 1 + normal(C, scale=0.1), p + "ln_2.bias": normal(C, scale=0.1),
            p + "mlp.c_fc.weight": normal(C, 4 * C), p + "mlp.c_fc.bias": normal(4 * C, scale=0.1),
            p + "mlp.c_proj.weight": normal(4 * C, C), p + "mlp.c_proj.bias": normal(C, scale=0.1),
            # buffers that older transformers versions saved; a loader must skip them
            p + "attn.bias": np.tril(np.ones((L, L), dtype=np.float32))[None, None],
            p + "attn.masked_bias": np.array(-1e4, dtype=np.float32),
        })
    t[f"{prefix}ln_f.weight"] = 1 + normal(C, scale=0.1)
    t[f"{prefix}ln_f.bias"] = normal(C, scale=0.1)
    t["lm_head.weight"] = t[f"{prefix}wte.weight"].copy()     # tied: present in some files
    return t


def write_hf_dir(path, tensors, config=None):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or hf_config()))
    return path


def gpt2_reference_logits(t, ids, prefix="transformer."):
    """GPT-2's forward pass in plain float64 NumPy, on the tensors in Hugging Face's orientation."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    T, Dh = len(ids), C // H

    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + EPS) * t[name + ".weight"] + t[name + ".bias"]

    def conv1d(x, name):                                   # HF's Conv1D: x @ W + b, W (in, out)
        return x @ t[name + ".weight"] + t[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    x = t[prefix + "wte.weight"][ids] + t[prefix + "wpe.weight"][:T]          # (T, C)
    for i in range(N_LAYER):
        p = f"{prefix}h.{i}."
        q, k, v = np.split(conv1d(layer_norm(x, p + "ln_1"), p + "attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(T, H, Dh).transpose(1, 0, 2) for a in (q, k, v))  # (H, T, Dh)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(Dh)
        scores[:, np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        y = (weights @ v).transpose(1, 0, 2).reshape(T, C)
        x = x + conv1d(y, p + "attn.c_proj")
        x = x + conv1d(gelu_new(conv1d(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return layer_norm(x, prefix + "ln_f") @ t[prefix + "wte.weight"].T         # (T, V)


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_hand_built_directory_loads_into_the_right_places(tmp_path, prefix):
    tensors = hf_tensors(prefix=prefix)
    model = load_hf_gpt2(write_hf_dir(tmp_path / "gpt2", tensors))
    cfg = model.config
    assert (cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.n_head, cfg.n_layer) == (V, L, C, H, N_LAYER)
    assert cfg.layer_norm_eps == EPS and cfg.gelu_approximate == "tanh" and cfg.dropout == 0.1
    assert not model.training

    block = model.h[1]
    c_attn = tensors[prefix + "h.1.attn.c_attn.weight"]                      # (in C, out 3C)
    # output column 2C + 3 of c_attn is v's dimension 3; row 5 is input feature 5
    assert block.attn.c_attn.weight.data[2 * C + 3, 5] == c_attn[5, 2 * C + 3]
    assert block.attn.c_attn.weight.data[C + 1, 0] == c_attn[0, C + 1]          # k, dimension 1
    np.testing.assert_array_equal(block.attn.c_attn.bias.data, tensors[prefix + "h.1.attn.c_attn.bias"])
    np.testing.assert_array_equal(block.mlp.c_fc.weight.data, tensors[prefix + "h.1.mlp.c_fc.weight"].T)
    np.testing.assert_array_equal(block.mlp.c_proj.weight.data, tensors[prefix + "h.1.mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(model.h[0].ln_2.bias.data, tensors[prefix + "h.0.ln_2.bias"])
    np.testing.assert_array_equal(model.wpe.weight.data, tensors[prefix + "wpe.weight"])
    np.testing.assert_array_equal(model.ln_f.weight.data, tensors[prefix + "ln_f.weight"])

    ids = np.array([3, 0, 12, 7, 7, 1])
    expected = gpt2_reference_logits(tensors, ids, prefix)
    with mm.no_grad():
        logits32 = model(ids[None]).numpy()[0]
    np.testing.assert_allclose(logits32, expected, rtol=1e-4, atol=1e-4)
    model64 = load_hf_gpt2(tmp_path / "gpt2", dtype=np.float64)
    with mm.no_grad():
        logits64 = model64(ids[None]).numpy()[0]
    np.testing.assert_allclose(logits64, expected, rtol=1e-10, atol=1e-10)


def test_first_position_logit_by_hand(tmp_path):
    """Position 0 attends only to itself (softmax weight 1), so the block is a chain of affine maps."""
    tensors = hf_tensors(seed=3)
    model = load_hf_gpt2(write_hf_dir(tmp_path / "gpt2", tensors), dtype=np.float64)
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    p = "transformer.h.{}."

    def ln(x, name):
        return (x - x.mean()) / np.sqrt(x.var() + EPS) * t[name + ".weight"] + t[name + ".bias"]

    x = t["transformer.wte.weight"][4] + t["transformer.wpe.weight"][0]
    for i in range(N_LAYER):
        qkv = ln(x, p.format(i) + "ln_1") @ t[p.format(i) + "attn.c_attn.weight"] + t[p.format(i) + "attn.c_attn.bias"]
        v = qkv[2 * C:]                                        # one key: attention returns v itself
        x = x + v @ t[p.format(i) + "attn.c_proj.weight"] + t[p.format(i) + "attn.c_proj.bias"]
        h = ln(x, p.format(i) + "ln_2") @ t[p.format(i) + "mlp.c_fc.weight"] + t[p.format(i) + "mlp.c_fc.bias"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h * h * h)))
        x = x + h @ t[p.format(i) + "mlp.c_proj.weight"] + t[p.format(i) + "mlp.c_proj.bias"]
    logit_9 = ln(x, "transformer.ln_f") @ t["transformer.wte.weight"][9]
    with mm.no_grad():
        assert model(np.array([[4]])).numpy()[0, 0, 9] == pytest.approx(logit_9, rel=1e-12)


def test_save_then_load_round_trips_logits_exactly(tmp_path):
    config = GPTConfig(vocab_size=37, context_length=16, n_layer=2, n_head=4, d_model=16, dropout=0.0,
                       layer_norm_eps=1e-6)
    model = GPT(config)
    for param in model.parameters():                          # make every tensor non-trivial
        param.data[...] = np.random.default_rng(param.size).standard_normal(param.shape) * 0.3
    save_hf_gpt2(model, tmp_path / "out")
    loaded = load_hf_gpt2(tmp_path / "out")
    assert loaded.config == config
    ids = np.random.default_rng(0).integers(0, 37, (3, 16))
    model.eval()
    with mm.no_grad():
        np.testing.assert_array_equal(model(ids).numpy(), loaded(ids).numpy())
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


def test_saved_directory_has_gpt2_layout(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny"))
    save_hf_gpt2(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"], config["vocab_size"]) \
        == (32, 2, 2, 64, 256)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert load_metadata(tmp_path / "out" / "model.safetensors") == {"format": "pt"}
    assert "lm_head.weight" not in tensors and all(k.startswith("transformer.") for k in tensors)
    assert len(tensors) == len(list(model.parameters()))
    np.testing.assert_array_equal(tensors["transformer.h.1.attn.c_attn.weight"], model.h[1].attn.c_attn.weight.data.T)
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)       # Conv1D: (in, out)
    assert tensors["transformer.h.0.mlp.c_proj.weight"].shape == (128, 32)


def test_half_precision_files_load_as_float32(tmp_path):
    tensors = {k: v.astype(np.float16) for k, v in hf_tensors().items()}
    model = load_hf_gpt2(write_hf_dir(tmp_path / "half", tensors))
    assert model.wte.weight.dtype == np.float32
    np.testing.assert_array_equal(model.wte.weight.data, tensors["transformer.wte.weight"].astype(np.float32))


def test_exact_gelu_and_dropout_override(tmp_path):
    model = load_hf_gpt2(write_hf_dir(tmp_path / "d", hf_tensors(), hf_config(activation_function="gelu")),
                         dropout=0.0)
    assert model.config.gelu_approximate == "none" and model.config.dropout == 0.0


def _error_for(tmp_path, tensors, config=None):
    with pytest.raises(ValueError) as info:
        load_hf_gpt2(write_hf_dir(tmp_path / "bad", tensors, config))
    return str(info.value)


def test_missing_tensor_is_named(tmp_path):
    tensors = hf_tensors()
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    assert "missing tensor(s): transformer.h.1.mlp.c_fc.bias" in _error_for(tmp_path, tensors)


def test_misshaped_tensor_is_named(tmp_path):
    tensors = hf_tensors()
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"].T.copy()
    message = _error_for(tmp_path, tensors)
    assert "transformer.h.0.attn.c_attn.weight: shape (24, 8), expected (8, 24)" in message


def test_unexpected_tensor_is_named(tmp_path):
    tensors = hf_tensors()
    tensors["transformer.h.0.attn.rotary"] = np.zeros(3, dtype=np.float32)
    assert "unexpected tensor(s): transformer.h.0.attn.rotary" in _error_for(tmp_path, tensors)


@pytest.mark.parametrize("override, message", [
    ({"n_inner": 7}, "n_inner=7"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_config_is_refused(tmp_path, override, message):
    assert message in _error_for(tmp_path, hf_tensors(), hf_config(**override))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin is a pickle"):
        load_hf_gpt2(tmp_path)


def test_bias_free_models_cannot_be_saved(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny", bias=False))
    with pytest.raises(ValueError, match="bias=False"):
        save_hf_gpt2(model, tmp_path / "nobias")


def test_load_on_device(tmp_path, device):
    tensors = hf_tensors()
    path = write_hf_dir(tmp_path / "gpt2", tensors)
    model = load_hf_gpt2(path, device=device)
    assert model.wte.weight.device.startswith(device)
    ids = np.array([[1, 2, 3, 4]])
    with mm.no_grad():
        logits = model(ids).numpy()[0]
    np.testing.assert_allclose(logits, gpt2_reference_logits(tensors, ids[0]), rtol=1e-4, atol=1e-4)


def test_every_problem_of_a_file_is_in_one_error(tmp_path):
    """docs/generation.md: a file that does not fit gets ONE error listing every missing, unexpected and
    mis-shaped tensor by its GPT-2 name."""
    tensors = hf_tensors()
    del tensors["transformer.h.1.mlp.c_fc.bias"], tensors["transformer.ln_f.weight"]
    tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((C, C + 1), np.float32)
    tensors["transformer.h.0.attn.rotary"] = np.zeros(3, np.float32)
    message = _error_for(tmp_path, tensors)
    assert "missing tensor(s): transformer.h.1.mlp.c_fc.bias, transformer.ln_f.weight" in message
    assert f"transformer.h.0.attn.c_proj.weight: shape ({C}, {C + 1}), expected ({C}, {C})" in message
    assert "unexpected tensor(s): transformer.h.0.attn.rotary" in message


def test_a_gpt2_directory_brings_its_own_tokenizer_files(tmp_path, shared_data, capsys):
    """docs/generation.md: with GPT-2's tokenizer files beside the weights (encoder.json + vocab.bpe, or the
    hub's names for them, vocab.json + merges.txt), `minillm generate --hf-gpt2 DIR` needs nothing else.
    The ids are GPT-2's published ones ("Hello world" = 15496, 995)."""
    import shutil  # noqa: PLC0415

    from minillm.cli import main  # noqa: PLC0415
    from minillm.generate import generate  # noqa: PLC0415
    from minillm.weights.pretrained import load_pretrained  # noqa: PLC0415

    files = shared_data / "gpt2"
    if not (files / "encoder.json").is_file() or not (files / "vocab.bpe").is_file():
        pytest.skip(f"GPT-2's tokenizer files are not in {files}")
    mm.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=16, n_layer=1, n_head=2, d_model=8))
    for names in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        directory = save_hf_gpt2(model, tmp_path / names[0])
        for source, name in zip(("encoder.json", "vocab.bpe"), names):
            shutil.copyfile(files / source, directory / name)
        _, tokenizer = load_pretrained(directory)
        assert tokenizer.encode("Hello world") == [15496, 995] and tokenizer.special_tokens == {"<|endoftext|>": 50256}
    assert main(["generate", "--hf-gpt2", str(directory), "--prompt", "Hello world", "--max-new-tokens", "3",
                 "--temperature", "0", "--ignore-eos"]) == 0
    expected = generate(model, [[15496, 995]], 3, temperature=0)[0]
    assert capsys.readouterr().out == tokenizer.decode(expected.tolist()) + "\n"
    bare = save_hf_gpt2(model, tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="no GPT-2 tokenizer files"):
        load_pretrained(bare)
