"""The one error every Hugging Face mapping raises when a file's tensors do not fit the model.

    raise_unless_fits("ckpt/model.safetensors", "GPT-2 with GPTConfig(...)",
                      missing=["transformer.h.1.mlp.c_fc.bias"], mismatched=[], unexpected=[])
    # ValueError: ckpt/model.safetensors does not fit GPT-2 with GPTConfig(...):
    #   missing tensor(s): transformer.h.1.mlp.c_fc.bias

Each mapping (``hf_gpt2``, ``hf_llama``) collects the problems in the file's own
tensor names; this reports them all at once, in a fixed order, so that one
message says everything that is wrong with a checkpoint.
"""

from __future__ import annotations


def raise_unless_fits(source, target: str, missing, mismatched, unexpected) -> None:
    """Raise one ValueError listing every problem (``source`` does not fit ``target``); nothing if all lists are empty.

    ``missing`` and ``unexpected`` are tensor names, ``mismatched`` lines of the
    form ``"name: shape (..), expected (..)"``.
    """
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing)}")
    if mismatched:
        problems.append(f"mis-shaped tensor(s): {'; '.join(mismatched)}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not fit {target}:\n  " + "\n  ".join(problems))
