"""Llama and Qwen3 checkpoints in the Hugging Face layout, mapped onto the configurable decoder.

Both are the same decoder as far as tensors go (Qwen3 adds ``q_norm``/``k_norm``),
so one table serves both. Hugging Face name (``model.layers.{i}.`` = L) -> ours:

    model.embed_tokens.weight        (V, C)                -> wte.weight
    L.input_layernorm.weight         (C,)                  -> h.{i}.ln_1.weight
    L.self_attn.q_proj.weight        (H·Dh, C)   ┐
    L.self_attn.k_proj.weight        (Hkv·Dh, C) ├ rows    -> h.{i}.attn.c_attn.weight ((H + 2·Hkv)·Dh, C)
    L.self_attn.v_proj.weight        (Hkv·Dh, C) ┘ stacked
    L.self_attn.q_norm.weight        (Dh,)                 -> h.{i}.attn.q_norm.weight   (Qwen3)
    L.self_attn.k_norm.weight        (Dh,)                 -> h.{i}.attn.k_norm.weight   (Qwen3)
    L.self_attn.o_proj.weight        (C, H·Dh)             -> h.{i}.attn.c_proj.weight
    L.post_attention_layernorm.weight (C,)                 -> h.{i}.ln_2.weight
    L.mlp.gate_proj.weight           (I, C)      ┐ rows    -> h.{i}.mlp.c_fc.weight (2I, C)
    L.mlp.up_proj.weight             (I, C)      ┘ stacked
    L.mlp.down_proj.weight           (C, I)                -> h.{i}.mlp.c_proj.weight
    model.norm.weight                (C,)                  -> ln_f.weight
    lm_head.weight                   (V, C)                -> lm_head.weight (untied), else tied to wte

Both store Linear weights as (out, in), like ours: nothing is transposed, the
packed layers are only stacked (loading) and cut apart (saving). The rotary
layout needs no permutation either: Hugging Face's Llama and Qwen3 pair
feature i with i + Dh/2 ("rotate_half"), as ``F.rope`` does.

config.json -> GPTConfig: hidden_size -> d_model, intermediate_size ->
mlp_hidden, num_hidden_layers -> n_layer, num_attention_heads -> n_head,
num_key_value_heads -> n_kv_head, head_dim, rms_norm_eps -> layer_norm_eps,
max_position_embeddings -> context_length, rope_theta, rope_scaling (Llama 3's
"llama3" type only; newer files put both in ``rope_parameters``),
tie_word_embeddings. Refused, by name: hidden_act other than silu,
attention_bias / mlp_bias, any other rope scaling type, sliding-window attention.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..models.gpt import INIT_STD, LLAMA_STYLE, GPT, GPTConfig
from .fit import config_number, raise_unless_fits
from ..checks import is_integer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# buffers some older files carry: the rotary frequencies (recomputed from the config)
_IGNORED_SUFFIX = ".self_attn.rotary_emb.inv_freq"


# ------------------------------------------------------------------ config.json


def _rope_settings(hf: dict, unsupported: list) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either the older keys or ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    theta = config_number(params if "rope_theta" in params else hf, "rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        unsupported.append(f"rope scaling type {kind!r} (only 'llama3' is implemented)")
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": "llama3", **{key: scaling[key] for key in keys if key in scaling}}


def config_from_hf(hf: dict) -> GPTConfig:
    """A GPTConfig from a Llama or Qwen3 ``config.json`` (refusing, by name, settings it cannot run)."""
    model_type = hf.get("model_type")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise ValueError(f"config.json ({model_type}): missing field(s) {', '.join(missing)}")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']!r} (the SwiGLU MLP here uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            unsupported.append(f"{flag}=true")
    if hf.get("use_sliding_window", False):
        unsupported.append("use_sliding_window=true (sliding-window attention)")
    other_layers = sorted({kind for kind in hf.get("layer_types") or () if kind != "full_attention"})
    if other_layers:
        unsupported.append(f"layer_types {', '.join(map(repr, other_layers))} (only full attention)")
    rope_theta, rope_scaling = _rope_settings(hf, unsupported)
    if unsupported:
        raise ValueError(f"config.json: settings this {model_type} loader does not implement: "
                         + "; ".join(unsupported))
    n_head, head_dim = hf["num_attention_heads"], hf.get("head_dim")
    if head_dim is None and all(is_integer(v) and v > 0
                                for v in (n_head, hf["hidden_size"])):
        head_dim = hf["hidden_size"] // n_head     # transformers' default, floored; other values: GPTConfig names them
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        d_model=hf["hidden_size"],
        dropout=0.0,                                   # attention_dropout is a training setting
        layer_norm_eps=config_number(hf, "rms_norm_eps", 1e-6),
        mlp_hidden=hf["intermediate_size"],
        n_kv_head=n_head if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"],   # 0: refused
        head_dim=head_dim,
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),   # transformers' default for both
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        **LLAMA_STYLE,
    )


def model_type_for(config: GPTConfig) -> str:
    """"llama" or "qwen3" for a Llama-style configuration; a ValueError naming what does not fit."""
    wanted = dict(LLAMA_STYLE)
    off = [f"{key}={getattr(config, key)!r} (needs {value!r})" for key, value in wanted.items()
           if getattr(config, key) != value]
    if off:
        raise ValueError("this configuration is not a Llama or Qwen3 one: " + "; ".join(off))
    return "qwen3" if config.qk_norm else "llama"


def config_to_hf(config: GPTConfig, dtype=np.float32) -> dict:
    """The ``config.json`` of a LlamaForCausalLM (or Qwen3ForCausalLM when the config has q/k norm)."""
    model_type = model_type_for(config)
    hf = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": 4 * config.d_model if config.mlp_hidden is None else config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.layer_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "use_cache": True,
        "torch_dtype": np.dtype(dtype).name,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if model_type == "llama":
        hf.update(mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return hf


# ------------------------------------------------------------------ tensors


def tensor_table(config: GPTConfig) -> dict[str, list[tuple[str, int | None]]]:
    """Our parameter name -> its Hugging Face tensors [(name, rows)], stacked along axis 0 in that order.

    ``rows`` is each part's share of a packed weight (None: the whole tensor).
    """
    H, Hkv, Dh = config.n_head, config.n_kv_head, config.head_dim
    hidden = 4 * config.d_model if config.mlp_hidden is None else config.mlp_hidden
    table = {"wte.weight": [("model.embed_tokens.weight", None)], "ln_f.weight": [("model.norm.weight", None)]}
    if not config.tie_embeddings:
        table["lm_head.weight"] = [("lm_head.weight", None)]
    for i in range(config.n_layer):
        ours, hf = f"h.{i}.", f"model.layers.{i}."
        table[ours + "ln_1.weight"] = [(hf + "input_layernorm.weight", None)]
        table[ours + "attn.c_attn.weight"] = [(hf + "self_attn.q_proj.weight", H * Dh),
                                              (hf + "self_attn.k_proj.weight", Hkv * Dh),
                                              (hf + "self_attn.v_proj.weight", Hkv * Dh)]
        if config.qk_norm:
            table[ours + "attn.q_norm.weight"] = [(hf + "self_attn.q_norm.weight", None)]
            table[ours + "attn.k_norm.weight"] = [(hf + "self_attn.k_norm.weight", None)]
        table[ours + "attn.c_proj.weight"] = [(hf + "self_attn.o_proj.weight", None)]
        table[ours + "ln_2.weight"] = [(hf + "post_attention_layernorm.weight", None)]
        table[ours + "mlp.c_fc.weight"] = [(hf + "mlp.gate_proj.weight", hidden), (hf + "mlp.up_proj.weight", hidden)]
        table[ours + "mlp.c_proj.weight"] = [(hf + "mlp.down_proj.weight", None)]
    return table


def hf_to_state_dict(tensors: dict, model: GPT, source="checkpoint") -> dict:
    """Llama/Qwen3 tensors ``{hf name: array}`` -> our ``state_dict``; every problem reported at once."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    table = tensor_table(model.config)
    known = {hf_name for parts in table.values() for hf_name, _ in parts}
    state, missing, mismatched, not_float = {}, [], [], []
    for name, parts in table.items():
        arrays = []
        for hf_name, rows in parts:
            want = expected[name] if rows is None else (rows,) + expected[name][1:]
            if hf_name not in tensors:
                missing.append(hf_name)
            elif tuple(tensors[hf_name].shape) != want:
                mismatched.append(f"{hf_name}: shape {tuple(tensors[hf_name].shape)}, expected {want}")
            elif tensors[hf_name].dtype.kind != "f":
                not_float.append(f"{hf_name} ({tensors[hf_name].dtype})")
            else:
                arrays.append(tensors[hf_name])
        if len(arrays) == len(parts):
            state[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    tied_head = model.config.tie_embeddings and "lm_head.weight" in tensors     # a tied copy: not read
    if tied_head and tuple(tensors["lm_head.weight"].shape) != expected["wte.weight"]:
        mismatched.append(f"lm_head.weight: shape {tuple(tensors['lm_head.weight'].shape)}, "
                          f"expected {expected['wte.weight']}")
    unexpected = [n for n in tensors if n not in known and not n.endswith(_IGNORED_SUFFIX)
                  and not (tied_head and n == "lm_head.weight")]
    raise_unless_fits(source, f"{model_type_for(model.config)} with {model.config}", missing, mismatched, unexpected,
                      not_float)
    return state


def state_dict_to_hf(model: GPT) -> dict[str, np.ndarray]:
    """Our parameters as Hugging Face Llama/Qwen3 tensors: the packed weights cut back into their parts."""
    parameters = dict(model.named_parameters())
    tensors = {}
    for name, parts in tensor_table(model.config).items():
        array = backend.to_numpy(parameters[name].data)
        start = 0
        for hf_name, rows in parts:
            stop = array.shape[0] if rows is None else start + rows
            tensors[hf_name] = np.ascontiguousarray(array[start:stop])
            start = stop
    return tensors
