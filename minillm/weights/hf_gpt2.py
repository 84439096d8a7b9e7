"""GPT-2 checkpoints in the Hugging Face layout: a directory with ``config.json`` and ``model.safetensors``.

    model = load_hf_gpt2("gpt2/")          # -> GPT, in eval mode, float32 on the CPU
    save_hf_gpt2(model, "my-model/")        # -> config.json + model.safetensors that other tools read

Our GPT uses GPT-2's own module names, so the mapping is nearly the identity.
What differs, tensor by tensor (HF name -> ours):

    transformer.wte.weight              (V, C)        -> wte.weight           same
    transformer.wpe.weight              (L, C)        -> wpe.weight           same
    transformer.h.{i}.ln_1.weight/bias  (C,)          -> h.{i}.ln_1.*         same (ln_2, ln_f alike)
    transformer.h.{i}.attn.c_attn.weight (C, 3C)      -> h.{i}.attn.c_attn.weight (3C, C)  TRANSPOSED
    transformer.h.{i}.attn.c_proj.weight (C, C)       -> ... (C, C)                        TRANSPOSED
    transformer.h.{i}.mlp.c_fc.weight    (C, 4C)      -> ... (4C, C)                       TRANSPOSED
    transformer.h.{i}.mlp.c_proj.weight  (4C, C)      -> ... (C, 4C)                       TRANSPOSED
    (biases of those four layers keep their shapes)
    lm_head.weight                       (V, C)       -> (none: tied to wte.weight; ignored if present)
    transformer.h.{i}.attn.bias, .attn.masked_bias    -> (none: the causal-mask buffers; ignored)

- GPT-2's ``Conv1D`` computes ``x @ W + b`` with W stored (in, out); a Linear
  stores the transpose (out, in) and computes ``x @ Wᵀ + b``. Hence the transposes.
- ``c_attn`` packs q, k, v along its output axis, in that order, each head's
  Dh columns side by side within each: output column ``j·C + h·Dh + d`` is
  (q|k|v)[j], head h, dimension d. Our MultiHeadAttention splits its (B, T, 3C)
  projection the same way, so the packed matrix needs no reordering.
- Some files (saved from ``GPT2Model`` rather than ``GPT2LMHeadModel``) name the
  tensors without the ``transformer.`` prefix; both are read.
- ``activation_function`` "gelu_new" (and "gelu_pytorch_tanh") is GELU's tanh
  approximation; "gelu" is the exact, erf form.

config.json -> GPTConfig: vocab_size, n_positions (or the older n_ctx) ->
context_length, n_layer, n_head, n_embd -> d_model, layer_norm_epsilon ->
layer_norm_eps, resid_pdrop -> dropout (one rate for all three dropout sites;
the model is returned in eval mode, so it only matters when fine-tuning).
Settings that would change the math our GPT computes (an MLP width other than
4C, untied embeddings, per-layer attention scaling, cross-attention) are refused
with an error rather than silently ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .. import backend
from ..models.gpt import INIT_STD, GPT, GPTConfig
from .fit import config_number, raise_unless_fits

PREFIX = "transformer."
# our names of the four Conv1D layers, whose weights are stored transposed
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# GPT-2's causal-mask buffers: saved by older versions of transformers, never parameters
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ------------------------------------------------------------------ config.json


def config_from_hf(hf: dict) -> GPTConfig:
    """A GPTConfig from the contents of a GPT-2 ``config.json`` (refusing settings our GPT cannot run)."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"config.json: model_type is {model_type!r}, but only 'gpt2' checkpoints can be loaded")
    required = ("vocab_size", "n_embd", "n_layer", "n_head")
    missing = [key for key in required if key not in hf]
    if "n_positions" not in hf and "n_ctx" not in hf:
        missing.append("n_positions")
    if missing:
        raise ValueError(f"config.json: missing field(s) {', '.join(missing)}")
    activation = hf.get("activation_function", "gelu_new")
    if activation in _TANH_GELUS:
        gelu = "tanh"
    elif activation == "gelu":
        gelu = "none"
    else:
        raise ValueError(f"config.json: activation_function {activation!r} is not supported "
                         f"(GPT-2 uses 'gelu_new', GELU's tanh form; 'gelu' is the exact one)")
    d_model = hf["n_embd"]
    unsupported = []
    if hf.get("n_inner") not in (None, 4 * d_model):
        unsupported.append(f"n_inner={hf['n_inner']} (our MLP is 4 * n_embd = {4 * d_model} wide)")
    if not hf.get("tie_word_embeddings", True):
        unsupported.append("tie_word_embeddings=false (our output head is always wte)")
    if not hf.get("scale_attn_weights", True):
        unsupported.append("scale_attn_weights=false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("add_cross_attention", False):
        unsupported.append("add_cross_attention=true")
    if unsupported:
        raise ValueError("config.json: settings this GPT does not implement: " + "; ".join(unsupported))
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("n_positions", hf.get("n_ctx")),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        d_model=d_model,
        dropout=config_number(hf, "resid_pdrop", 0.0),
        bias=True,
        layer_norm_eps=config_number(hf, "layer_norm_epsilon", 1e-5),
        gelu_approximate=gelu,
    )


def config_to_hf(config: GPTConfig, dtype=np.float32) -> dict:
    """The ``config.json`` of a GPT2LMHeadModel with this shape."""
    if not config.bias:
        raise ValueError("save_hf_gpt2: GPT-2's format has biases in every Linear and LayerNorm; "
                         "this model was built with bias=False")
    gpt2_values = dict(positions="learned", norm="layernorm", mlp="gelu", n_kv_head=config.n_head,
                       head_dim=config.d_model // config.n_head, qk_norm=False, tie_embeddings=True)
    off = [f"{name}={getattr(config, name)!r}" for name, value in gpt2_values.items() if getattr(config, name) != value]
    if config.mlp_hidden not in (None, 4 * config.d_model):
        off.append(f"mlp_hidden={config.mlp_hidden}")
    if off:
        raise ValueError(f"save_hf_gpt2: GPT-2's format cannot hold {', '.join(off)}")
    hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": INIT_STD,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": np.dtype(dtype).name,
    }
    # GPT-2's own tokenizer: <|endoftext|> (50256) begins and ends texts; other vocabularies say
    # "none" explicitly, as readers of config.json otherwise assume 50256
    hf["bos_token_id"] = hf["eos_token_id"] = 50256 if config.vocab_size == 50257 else None
    return hf


# ------------------------------------------------------------------ tensors


def _ours(hf_name: str) -> str:
    return hf_name[len(PREFIX):] if hf_name.startswith(PREFIX) else hf_name


def hf_to_state_dict(tensors: dict, model: GPT, source="checkpoint") -> dict:
    """GPT-2 tensors ``{hf name: array}`` -> our ``state_dict`` for ``model``, checked.

    Every problem is collected and reported at once, in GPT-2's names: missing
    tensors, unexpected ones, and shape mismatches (in the file's (in, out)
    orientation for Conv1D weights).
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state, unexpected, mismatched, not_float, seen = {}, [], [], [], {}
    for hf_name, array in tensors.items():
        name = _ours(hf_name)
        if _IGNORED.match(name):
            continue
        if name == "lm_head.weight":             # tied to wte: HF overwrites it with wte on loading too
            if tuple(array.shape) != expected["wte.weight"]:
                mismatched.append(f"{hf_name}: shape {tuple(array.shape)}, expected {expected['wte.weight']}")
            continue
        if name not in expected:
            unexpected.append(hf_name)
            continue
        if name in seen:
            raise ValueError(f"{source}: tensor {name!r} appears twice ({seen[name]!r} and {hf_name!r})")
        seen[name] = hf_name
        transposed = bool(_CONV1D.match(name))
        want = expected[name][::-1] if transposed else expected[name]   # in the file's orientation
        if tuple(array.shape) != want:
            mismatched.append(f"{hf_name}: shape {tuple(array.shape)}, expected {want}")
            continue
        if array.dtype.kind != "f":
            not_float.append(f"{hf_name} ({array.dtype})")
            continue
        state[name] = array.T if transposed else array                  # Conv1D (in, out) -> (out, in)
    missing = [PREFIX + name for name in expected if name not in seen]
    raise_unless_fits(source, f"GPT-2 with {model.config}", missing, mismatched, unexpected, not_float)
    return state


def state_dict_to_hf(model: GPT) -> dict[str, np.ndarray]:
    """Our parameters as GPT2LMHeadModel tensors ``{"transformer.…": NumPy array}``, Conv1D weights transposed."""
    tensors = {}
    for name, param in model.named_parameters():
        array = backend.to_numpy(param.data)
        if _CONV1D.match(name):
            array = np.ascontiguousarray(array.T)    # (out, in) -> GPT-2's (in, out)
        tensors[PREFIX + name] = array
    return tensors


# ------------------------------------------------------------------ directories (the general reader/writer)


def load_hf_gpt2(directory: str | os.PathLike, device=None, dtype=np.float32, dropout: float | None = None) -> GPT:
    """A GPT from a Hugging Face GPT-2 directory: ``minillm.weights.load_hf`` restricted to model_type gpt2.

    The weights are converted to ``dtype`` (bfloat16 and float16 files included)
    and placed on ``device``. ``dropout`` overrides the config's ``resid_pdrop``.
    The model is returned in eval mode, ready to generate.
    """
    from .hf import load_hf  # noqa: PLC0415 (hf imports this module for its GPT-2 case)

    return load_hf(directory, device=device, dtype=dtype, dropout=dropout, model_types=("gpt2",))


def save_hf_gpt2(model: GPT, directory: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 directory: ``config.json`` + ``model.safetensors``.

    The tensors keep the model's dtype; ``lm_head.weight`` is not written (it is
    tied to ``transformer.wte.weight``, and Hugging Face's own safetensors files
    omit it too). Returns the directory. ``minillm.weights.save_hf`` does the writing.
    """
    from .hf import save_hf  # noqa: PLC0415 (hf imports this module for its GPT-2 case)

    if not isinstance(model, GPT):
        raise TypeError(f"save_hf_gpt2: expected a minillm GPT, got {type(model).__name__}")
    config_to_hf(model.config)                           # refuses what GPT-2's format cannot hold, by name
    return save_hf(model, directory)
