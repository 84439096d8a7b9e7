"""The one error every Hugging Face mapping raises when a file's tensors do not fit the model.

    raise_unless_fits("ckpt/model.safetensors", "GPT-2 with GPTConfig(...)",
                      missing=["transformer.h.1.mlp.c_fc.bias"], mismatched=[], unexpected=[])
    # ValueError: ckpt/model.safetensors does not fit GPT-2 with GPTConfig(...):
    #   missing tensor(s): transformer.h.1.mlp.c_fc.bias

Each mapping (``hf_gpt2``, ``hf_llama``) collects the problems in the file's own
tensor names; this reports them all at once, in a fixed order, so that one
message says everything that is wrong with a checkpoint. ``config_number`` is
the mappings' one reader of a numeric config.json field.
"""

from __future__ import annotations

from ..checks import is_real


def raise_unless_fits(source, target: str, missing, mismatched, unexpected, not_float=()) -> None:
    """Raise one ValueError listing every problem (``source`` does not fit ``target``); nothing if all lists are empty.

    ``missing`` and ``unexpected`` are tensor names, ``mismatched`` lines of the
    form ``"name: shape (..), expected (..)"``, ``not_float`` lines ``"name (int8)"``
    for tensors whose dtype is not floating point (every parameter is: an integer
    tensor, e.g. a quantised one, would otherwise be cast silently).
    """
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing)}")
    if mismatched:
        problems.append(f"mis-shaped tensor(s): {'; '.join(mismatched)}")
    if not_float:
        problems.append(f"tensor(s) not floating point: {', '.join(not_float)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not fit {target}:\n  " + "\n  ".join(problems))


def config_number(hf: dict, key: str, default: float) -> float:
    """``float(hf[key])`` (``default`` when absent), or a ValueError naming the field if it is not a number."""
    value = hf.get(key, default)
    if not is_real(value):
        raise ValueError(f"config.json: {key} must be a number, got {value!r}")
    return float(value)
