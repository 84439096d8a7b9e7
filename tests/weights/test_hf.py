"""load_hf / save_hf: hand-built Llama and Qwen3 directories (Hugging Face names), bf16/fp16 files,
shards, round trips, and the errors that name what is unsupported."""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import minillm as mm
from minillm.models import GPT, GPTConfig
from minillm.weights import load_hf, save_hf, save_hf_gpt2
from minillm.weights.safetensors import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from nn_numpy_reference import llama_logits  # noqa: E402

V, C, H, HKV, DH, HIDDEN, N_LAYER = 19, 16, 4, 2, 6, 24, 2


def hf_config(model_type="llama", **overrides):
    config = {"model_type": model_type, "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": C,
              "intermediate_size": HIDDEN, "num_hidden_layers": N_LAYER, "num_attention_heads": H,
              "num_key_value_heads": HKV, "head_dim": DH, "hidden_act": "silu", "max_position_embeddings": 32,
              "rms_norm_eps": 1e-5, "rope_theta": 5000.0, "tie_word_embeddings": model_type == "qwen3",
              "attention_bias": False, "rope_scaling": None}
    if model_type == "llama":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config.update(overrides)
    return config


def hf_tensors(model_type="llama", seed=0):
    """Tensors with Hugging Face's Llama/Qwen3 names and shapes (separate q, k, v, gate, up)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=0.4, offset=0.0):
        return (offset + rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(V, C), "model.norm.weight": normal(C, scale=0.1, offset=1)}
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": normal(C, scale=0.1, offset=1),
            p + "self_attn.q_proj.weight": normal(H * DH, C), p + "self_attn.k_proj.weight": normal(HKV * DH, C),
            p + "self_attn.v_proj.weight": normal(HKV * DH, C), p + "self_attn.o_proj.weight": normal(C, H * DH),
            p + "post_attention_layernorm.weight": normal(C, scale=0.1, offset=1),
            p + "mlp.gate_proj.weight": normal(HIDDEN, C), p + "mlp.up_proj.weight": normal(HIDDEN, C),
            p + "mlp.down_proj.weight": normal(C, HIDDEN),
        })
        if model_type == "qwen3":
            t[p + "self_attn.q_norm.weight"] = normal(DH, scale=0.1, offset=1)
            t[p + "self_attn.k_norm.weight"] = normal(DH, scale=0.1, offset=1)
    t["lm_head.weight"] = normal(V, C) if model_type == "llama" else t["model.embed_tokens.weight"].copy()
    return t


def write_dir(path, tensors, config):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def reference_logits(tensors, config, ids):
    """The NumPy Llama/Qwen3 on the HF tensors, stacked by hand into the decoder's packed names."""
    sd = {"wte.weight": tensors["model.embed_tokens.weight"], "ln_f.weight": tensors["model.norm.weight"],
          "lm_head.weight": tensors["lm_head.weight"]}
    for i in range(N_LAYER):
        p, o = f"model.layers.{i}.", f"h.{i}."
        sd[o + "ln_1.weight"] = tensors[p + "input_layernorm.weight"]
        sd[o + "ln_2.weight"] = tensors[p + "post_attention_layernorm.weight"]
        sd[o + "attn.c_attn.weight"] = np.concatenate([tensors[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        sd[o + "attn.c_proj.weight"] = tensors[p + "self_attn.o_proj.weight"]
        sd[o + "mlp.c_fc.weight"] = np.concatenate([tensors[p + "mlp.gate_proj.weight"],
                                                    tensors[p + "mlp.up_proj.weight"]])
        sd[o + "mlp.c_proj.weight"] = tensors[p + "mlp.down_proj.weight"]
        for norm in ("q_norm", "k_norm"):
            if p + f"self_attn.{norm}.weight" in tensors:
                sd[o + f"attn.{norm}.weight"] = tensors[p + f"self_attn.{norm}.weight"]
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    cfg = GPTConfig(vocab_size=V, context_length=32, n_layer=N_LAYER, n_head=H, d_model=C, bias=False,
                    layer_norm_eps=config["rms_norm_eps"], positions="rope", norm="rmsnorm", mlp="swiglu",
                    mlp_hidden=HIDDEN, n_kv_head=HKV, head_dim=DH, qk_norm=config["model_type"] == "qwen3",
                    tie_embeddings=config["tie_word_embeddings"], rope_theta=config["rope_theta"],
                    rope_scaling=config["rope_scaling"])
    return llama_logits(ids, sd, cfg)


IDS = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 18, 0]])


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_hand_built_directory_gives_the_reference_logits(model_type, tmp_path):
    tensors, config = hf_tensors(model_type), hf_config(model_type)
    model = load_hf(write_dir(tmp_path / model_type, tensors, config), dtype=np.float64)
    cfg = model.config
    assert (cfg.n_kv_head, cfg.head_dim, cfg.qk_norm, cfg.tie_embeddings) == (HKV, DH, model_type == "qwen3",
                                                                             model_type == "qwen3")
    assert not model.training
    np.testing.assert_allclose(model(IDS).numpy(), reference_logits(tensors, config, IDS), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_save_writes_hugging_face_names_and_round_trips_exactly(model_type, tmp_path):
    tensors, config = hf_tensors(model_type), hf_config(model_type)
    model = load_hf(write_dir(tmp_path / "in", tensors, config))
    save_hf(model, tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    expected = {k: v for k, v in tensors.items() if not (model_type == "qwen3" and k == "lm_head.weight")}
    assert sorted(written) == sorted(expected)                        # tied heads are not written
    for name, array in expected.items():
        np.testing.assert_array_equal(written[name], array)
    saved_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved_config["model_type"] == model_type
    assert saved_config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]]
    for key in ("num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings", "rope_theta",
                "rope_scaling"):
        assert saved_config[key] == config[key]
    again = load_hf(tmp_path / "out")
    np.testing.assert_array_equal(again(IDS).numpy(), model(IDS).numpy())


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_sharded_directories_round_trip(preset, tmp_path):
    model = GPT(GPTConfig.from_preset(preset, tie_embeddings=preset == "tiny"))
    save_hf(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(p.data.nbytes for p in model.parameters())
    np.testing.assert_array_equal(load_hf(tmp_path)(IDS % 19).numpy(), model(IDS % 19).numpy())


def test_gpt2_goes_through_the_same_loader(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny"))
    save_hf_gpt2(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    np.testing.assert_array_equal(load_hf(tmp_path)(IDS).numpy(), model(IDS).numpy())
    with pytest.raises(ValueError, match="GPT-2's format cannot hold positions='rope'"):
        save_hf_gpt2(GPT(GPTConfig.from_preset("tiny", positions="rope")), tmp_path / "x")


def write_bf16(tensors, path):
    """A safetensors file with every tensor stored as BF16 (float32's top 16 bits), written by hand."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        bits = (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype("<u2")
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
        blobs.append(bits.tobytes())
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_bfloat16_and_float16_files(tmp_path):
    tensors, config = hf_tensors("qwen3"), hf_config("qwen3")
    truncated = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in tensors.items()}  # bf16 values
    (tmp_path / "bf16").mkdir()
    write_bf16(tensors, tmp_path / "bf16" / "model.safetensors")
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    model = load_hf(tmp_path / "bf16")
    assert model.wte.weight.dtype == np.float32
    np.testing.assert_array_equal(model.wte.weight.numpy(), truncated["model.embed_tokens.weight"])
    np.testing.assert_allclose(model(IDS).numpy(), reference_logits(truncated, config, IDS), rtol=1e-4, atol=1e-4)
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    model = load_hf(write_dir(tmp_path / "fp16", half, config))
    np.testing.assert_allclose(model(IDS).numpy(), reference_logits(half, config, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("override, message", [
    (dict(model_type="mistral"), "model_type is 'mistral', but only 'gpt2', 'llama', 'qwen3'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True, hidden_act="gelu"), "hidden_act='gelu'.*mlp_bias=true"),
    (dict(use_sliding_window=True), "use_sliding_window=true"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types 'sliding_attention'"),
])
def test_unsupported_settings_are_named(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_hf(write_dir(tmp_path, hf_tensors(), hf_config(**override)))


def test_newer_rope_parameters_key_is_read(tmp_path):
    config = hf_config(rope_theta=None, rope_scaling=None,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16})
    del config["rope_theta"], config["rope_scaling"]
    model = load_hf(write_dir(tmp_path, hf_tensors(), config))
    assert model.config.rope_theta == 5000.0 and model.config.rope_scaling["factor"] == 8.0


def test_tensor_problems_are_named_together(tmp_path):
    tensors = hf_tensors()
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((H * DH, C), np.float32)   # not GQA-shaped
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(3, np.float32)        # ignored buffer
    tensors["model.layers.0.self_attn.q_bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as error:
        load_hf(write_dir(tmp_path, tensors, hf_config()))
    message = str(error.value)
    assert "missing tensor(s): model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.0.self_attn.k_proj.weight: shape (24, 16), expected (12, 16)" in message
    assert "unexpected tensor(s): model.layers.0.self_attn.q_bias" in message and "inv_freq" not in message


def test_missing_files_and_bad_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors and no model.safetensors.index.json"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="lists shard 'gone.safetensors'"):
        load_hf(tmp_path)


def test_configurations_without_a_hugging_face_twin_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a Llama or Qwen3 one: norm='layernorm'"):
        save_hf(GPT(GPTConfig.from_preset("llama-tiny", norm="layernorm")), tmp_path)


def test_load_on_device(tmp_path, device):
    tensors, config = hf_tensors("qwen3"), hf_config("qwen3")
    model = load_hf(write_dir(tmp_path, tensors, config), device=device)
    assert model.wte.weight.device.startswith(device)
    with mm.no_grad():
        logits = model(IDS).numpy()
    np.testing.assert_allclose(logits, reference_logits(tensors, config, IDS), rtol=1e-4, atol=1e-4)
