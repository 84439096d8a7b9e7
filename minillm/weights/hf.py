"""Hugging Face checkpoint directories in and out, for every supported ``model_type``: gpt2, llama, qwen3.

    model = load_hf("Llama-3.2-1B/")          # config.json + model.safetensors (or a sharded index) -> GPT
    save_hf(model, "out/")                    # config.json + model.safetensors that transformers loads

A directory holds ``config.json`` and the weights, either one ``model.safetensors``
or several shards listed by ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``). Tensors may be float32,
bfloat16 (read as uint16 and widened, exactly, to float32) or float16; they are
converted to the model's ``dtype``.

``config.json``'s ``model_type`` picks the mapping, one module per family:
``hf_gpt2`` (GPT-2: Conv1D weights transposed) and ``hf_llama`` (Llama and
Qwen3: q/k/v and gate/up stacked into the decoder's packed layers). Each
provides ``config_from_hf``, ``config_to_hf``, ``hf_to_state_dict`` and
``state_dict_to_hf``; this module does the files. Settings a mapping cannot run
(another model_type, a rope scaling other than Llama 3's, attention biases on a
Llama, sliding windows, …) are refused with an error that names them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

from .. import backend
from ..models.gpt import GPT
from ..tokenizer.gpt2 import read_utf8
from . import hf_gpt2, hf_llama
from .safetensors import load_file, read_header, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAPPINGS = {"gpt2": hf_gpt2, "llama": hf_llama, "qwen3": hf_llama}


# ------------------------------------------------------------------ reading


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a checkpoint directory."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        hint = ""
        if (directory / "checkpoint.json").is_file():
            hint = ("; it holds a minillm checkpoint (checkpoint.json): read it with minillm.train.load_checkpoint "
                    "(model and tokenizer: minillm.train.run.load_run)")
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (expected a Hugging Face model directory){hint}")
    try:
        config = json.loads(read_utf8(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def read_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of the directory's ``model.safetensors``, or of all shards its index lists."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_FILE, directory / INDEX_FILE
    if single.is_file():
        return load_file(single)
    if not index.is_file():
        hint = ""
        if (directory / "pytorch_model.bin").is_file():
            hint = " (pytorch_model.bin is a pickle, which minillm does not read: convert it to safetensors)"
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE} and no {INDEX_FILE}{hint}")
    try:
        weight_map = json.loads(read_utf8(index))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index}: not a safetensors index (needs a \"weight_map\" object): {error}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: \"weight_map\" must be an object {{tensor name: shard file}}, "
                         f"got {type(weight_map).__name__}")
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ValueError(f"{index}: tensor {name!r} is mapped to {shard!r}, not a shard file name")
        by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):        # every shard checked (headers only) before any is read
        path = directory / shard
        if Path(shard).name != shard or not path.is_file():
            raise FileNotFoundError(f"{index}: lists shard {shard!r}, which is not a file in {directory}")
        in_file = read_header(path)[0]
        absent = [name for name in names if name not in in_file]
        if absent:
            raise ValueError(f"{index}: {path.name} lacks the tensor(s) it is said to hold: {', '.join(absent)}")
    tensors = {}
    for shard, names in sorted(by_shard.items()):
        tensors.update(load_file(directory / shard, names))
    return tensors


def load_hf(directory: str | os.PathLike, device=None, dtype=np.float32, dropout: float | None = None,
            model_types=None) -> GPT:
    """A GPT built and filled from a Hugging Face directory, in eval mode.

    ``model_type`` (config.json) chooses the architecture: gpt2, llama or qwen3
    (``model_types`` narrows the choice). The weights are converted to ``dtype``
    and placed on ``device``; ``dropout`` overrides the configured rate.
    """
    directory = Path(directory)
    device = None if device is None else backend.parse_device(device)   # a bad device or dtype: refused before
    dtype = _float_dtype(dtype)                                          # the weights are read, not after
    hf_config = read_config(directory)
    model_type = hf_config.get("model_type", "gpt2")
    allowed = tuple(MAPPINGS) if model_types is None else tuple(model_types)
    if model_type not in allowed:
        raise ValueError(f"{directory / CONFIG_FILE}: model_type is {model_type!r}, but only "
                         f"{', '.join(map(repr, allowed))} checkpoints can be loaded")
    mapping = MAPPINGS[model_type]
    try:
        config = mapping.config_from_hf(hf_config)
    except (ValueError, TypeError) as error:       # the mapping's and GPTConfig's own words, with the directory
        raise ValueError(f"{directory}: {error}") from None
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    tensors = read_tensors(directory)
    model = GPT(config, dtype=dtype)                     # built on the CPU; moved once loaded
    model.load_state_dict(mapping.hf_to_state_dict(tensors, model, source=str(directory)))
    del tensors
    if device is not None:
        model.to(device)
    return model.eval()


def _float_dtype(dtype) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"load_hf: dtype {dtype!r} is not a NumPy dtype (e.g. np.float32 or 'float16')") from None
    if dtype.kind != "f":
        raise TypeError(f"load_hf: dtype must be floating point, got {dtype}")
    return dtype


# ------------------------------------------------------------------ writing


def model_type_for(model: GPT) -> str:
    """The Hugging Face ``model_type`` a model's configuration corresponds to."""
    config = model.config
    if config.positions == "learned" and config.norm == "layernorm" and config.mlp == "gelu":
        return "gpt2"
    return hf_llama.model_type_for(config)


def save_hf(model: GPT, directory: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory that ``transformers`` loads; returns the directory.

    The model_type follows from the configuration (GPT-2's shape -> gpt2;
    rotary + RMSNorm + SwiGLU -> llama, or qwen3 with q/k norm). The tensors
    keep the model's dtype. With ``max_shard_bytes``, a model larger than that
    is written in shards ``model-00001-of-0000N.safetensors`` … plus
    ``model.safetensors.index.json``, Hugging Face's sharded layout. Saving over
    an earlier save removes the weight files of its other layout (a stale
    model.safetensors would be read before new shards: the old model, silently).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_hf: expected a minillm GPT, got {type(model).__name__}")
    model_type = model_type_for(model)
    mapping = MAPPINGS[model_type]
    hf_config = mapping.config_to_hf(model.config, dtype=model.wte.weight.dtype)
    tensors = mapping.state_dict_to_hf(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    stale = _weight_files(directory)                  # a previous save's: removed once they are replaced
    if len(shards) == 1:
        save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    else:
        # a model.safetensors left here would be read instead of the shards: gone before they are written,
        # so that a crash midway leaves a directory that fails to load rather than the old model
        (directory / WEIGHTS_FILE).unlink(missing_ok=True)
        weight_map = {}
        for number, names in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file({name: tensors[name] for name in names}, directory / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    if len(shards) == 1:
        (directory / INDEX_FILE).unlink(missing_ok=True)
    for path in stale - _weight_files(directory):     # shards of the previous save that the new one does not use
        path.unlink(missing_ok=True)
    return directory


def _weight_files(directory: Path) -> set[Path]:
    """The shard files the directory's index lists (named as save_hf names them; nothing else is touched)."""
    try:
        weight_map = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {directory / name for name in names if isinstance(name, str) and _SHARD_NAME.fullmatch(name)}


def _shards(tensors: dict, max_shard_bytes: int | None) -> list[list[str]]:
    """Tensor names in file order, cut into consecutive groups of at most ``max_shard_bytes`` (one if None).

    A tensor larger than the limit gets a shard of its own.
    """
    if max_shard_bytes is None:
        return [list(tensors)]
    if max_shard_bytes <= 0:
        raise ValueError(f"save_hf: max_shard_bytes must be positive, got {max_shard_bytes}")
    shards, size = [[]], 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += array.nbytes
    return shards
