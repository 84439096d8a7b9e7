"""Hugging Face directories and safetensors files that are damaged or inconsistent: each is one ValueError
(or FileNotFoundError) naming the file and what is wrong, never a TypeError from deep inside or a silent cast."""

import json
import re
import struct

import numpy as np
import pytest

from minillm.models import GPT, GPTConfig
from minillm.weights import SafetensorsError, load_file, load_hf, save_file, save_hf
from minillm.weights.pretrained import config_eos_id

GPT2_TINY = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, d_model=16)
LLAMA_TINY = GPTConfig(vocab_size=32, context_length=16, n_layer=2, n_head=2, d_model=16, bias=False,
                       positions="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=24, n_kv_head=1)


def saved(path, config=GPT2_TINY, max_shard_bytes=None):
    return save_hf(GPT(config), path, max_shard_bytes=max_shard_bytes)


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 32, None])
def test_a_dtype_that_is_not_a_name_is_named(tmp_path, dtype):
    header = json.dumps({"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(SafetensorsError, match=rf"w\.safetensors: tensor 'w' has unsupported dtype "
                                               rf"{re.escape(repr(dtype))} \(supported: F64, F32"):
        load_file(tmp_path / "w.safetensors")


@pytest.mark.parametrize("weight_map, message", [
    ([], r"\"weight_map\" must be an object \{tensor name: shard file\}, got list"),
    ({"transformer.wte.weight": 5}, r"tensor 'transformer\.wte\.weight' is mapped to 5, not a shard file name"),
])
def test_an_index_of_the_wrong_shape_is_named(tmp_path, weight_map, message):
    directory = saved(tmp_path / "m", max_shard_bytes=2000)
    edit_json(directory / "model.safetensors.index.json", lambda index: index.update(weight_map=weight_map))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: " + message):
        load_hf(directory)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_files_that_are_not_utf8_are_named(tmp_path, name):
    directory = saved(tmp_path / "m", max_shard_bytes=2000)
    (directory / name).write_bytes(b'{"model_type": "gpt2\xff"}')
    with pytest.raises(ValueError, match=rf"{re.escape(name)}, line 1: not UTF-8 text \(byte 0xff at byte offset 20\)"):
        load_hf(directory)


@pytest.mark.parametrize("config, name", [(GPT2_TINY, "transformer.h.0.attn.c_attn.weight"),
                                          (LLAMA_TINY, "model.layers.1.mlp.up_proj.weight")])
def test_integer_weights_are_refused_not_cast(tmp_path, config, name):
    """An integer (e.g. quantised) tensor where a float weight belongs would be cast to float silently."""
    directory = saved(tmp_path / "m", config)
    tensors = load_file(directory / "model.safetensors")
    tensors[name] = tensors[name].astype(np.int8)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ValueError, match=rf"not floating point: {re.escape(name)} \(int8\)"):
        load_hf(directory)


@pytest.mark.parametrize("config, field", [(GPT2_TINY, "layer_norm_epsilon"), (GPT2_TINY, "resid_pdrop"),
                                           (LLAMA_TINY, "rms_norm_eps"), (LLAMA_TINY, "rope_theta")])
def test_a_config_number_given_as_text_is_named(tmp_path, config, field):
    directory = saved(tmp_path / "m", config)
    edit_json(directory / "config.json", lambda hf: hf.update({field: "1e-5x"}))
    with pytest.raises(ValueError, match=rf"config\.json: {field} must be a number, got '1e-5x'"):
        load_hf(directory)


def test_a_config_that_gptconfig_refuses_names_the_directory(tmp_path):
    directory = saved(tmp_path / "m")
    edit_json(directory / "config.json", lambda hf: hf.update(n_layer="2"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(directory))}: GPTConfig: n_layer must be a positive integer"):
        load_hf(directory)


def test_end_of_text_id_of_a_damaged_config_names_the_file(tmp_path):
    directory = saved(tmp_path / "m")
    (directory / "config.json").write_text('{"eos_token_id": ')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        config_eos_id(directory)


@pytest.mark.parametrize("first_shards, second_shards", [(None, 2000), (2000, None), (1000, 4000)])
def test_saving_over_another_layout_leaves_only_the_new_weights(tmp_path, first_shards, second_shards):
    """A single model.safetensors left beside a new sharded save would be read first: the old model, silently."""
    import minillm as mm  # noqa: PLC0415

    mm.manual_seed(0)
    old = GPT(GPT2_TINY)
    mm.manual_seed(1)
    new = GPT(GPT2_TINY)
    save_hf(old, tmp_path, max_shard_bytes=first_shards)
    (tmp_path / "notes.txt").write_text("mine")                       # a file of the user's: kept
    save_hf(new, tmp_path, max_shard_bytes=second_shards)
    np.testing.assert_array_equal(load_hf(tmp_path).wte.weight.data, new.wte.weight.data)
    files = {p.name for p in tmp_path.iterdir()}
    if second_shards is None:
        assert files == {"config.json", "model.safetensors", "notes.txt"}
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert files == {"config.json", "model.safetensors.index.json", "notes.txt", *index["weight_map"].values()}


def test_every_shard_is_checked_before_any_is_read(tmp_path, monkeypatch):
    """A missing last shard (or one lacking its tensors) is found from the index and headers alone, before
    gigabytes of the earlier shards are read."""
    from minillm.weights import hf  # noqa: PLC0415

    directory = saved(tmp_path / "m", max_shard_bytes=2000)
    shards = sorted(directory.glob("model-*.safetensors"))
    reads = []
    monkeypatch.setattr(hf, "load_file", lambda *args, **kwargs: reads.append(args) or {})
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"lists shard '{shards[-1].name}', which is not a file"):
        load_hf(directory)
    save_file({"other": np.zeros(2, np.float32)}, shards[-1])
    with pytest.raises(ValueError, match=rf"{shards[-1].name} lacks the tensor\(s\) it is said to hold"):
        load_hf(directory)
    assert reads == []


def test_a_minillm_run_directory_given_to_load_hf_is_named(tmp_path):
    from minillm.train import save_checkpoint  # noqa: PLC0415

    save_checkpoint(tmp_path, model=GPT(GPT2_TINY), step=0)
    with pytest.raises(FileNotFoundError, match=r"no config\.json .* it holds a minillm checkpoint "
                                                r"\(checkpoint\.json\): read it with minillm\.train\.load_checkpoint"):
        load_hf(tmp_path)


@pytest.mark.parametrize("options, error, message", [
    ({"device": "tpu"}, ValueError, r"bad device 'tpu'"),
    ({"dtype": np.int32}, TypeError, r"load_hf: dtype must be floating point, got int32"),
    ({"dtype": "bf16"}, TypeError, r"load_hf: dtype 'bf16' is not a NumPy dtype"),
])
def test_a_bad_device_or_dtype_is_refused_before_the_weights_are_read(tmp_path, monkeypatch, options, error, message):
    from minillm.weights import hf  # noqa: PLC0415

    directory = saved(tmp_path / "m")
    reads = []
    monkeypatch.setattr(hf, "read_tensors", lambda *args: reads.append(args) or {})
    with pytest.raises(error, match=message):
        load_hf(directory, **options)
    assert reads == []
