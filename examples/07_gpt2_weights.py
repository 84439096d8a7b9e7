"""Example 7: GPT-2 checkpoints in and out (the Hugging Face layout: config.json + model.safetensors).

Builds a small random GPT, writes it as a GPT-2 directory with save_hf_gpt2,
shows what is inside (GPT-2's names, Conv1D weights stored transposed), loads
it back with load_hf_gpt2 and checks that the logits are bit-for-bit the same.

Given the path of a real GPT-2 directory (e.g. one downloaded from the Hugging
Face hub: config.json + model.safetensors), it then loads GPT-2 and continues a
prompt with GPT-2's tokenizer (from that directory, or from ../shared/data/gpt2):

    python examples/07_gpt2_weights.py
    python examples/07_gpt2_weights.py path/to/gpt2 --prompt "The meaning of life is"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm as mm  # noqa: E402
from minillm.commands.argtypes import device, positive_int  # noqa: E402
from minillm.weights.pretrained import load_pretrained  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.weights import load_hf_gpt2, save_hf_gpt2  # noqa: E402
from minillm.weights.hf import read_config  # noqa: E402
from minillm.weights.safetensors import read_header  # noqa: E402

SHARED_GPT2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gpt2"


def round_trip() -> float:
    """Save a random GPT as GPT-2, load it back; returns the largest logit difference (0.0)."""
    mm.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_gpt2(model, tmp)
        path = Path(tmp)
        print(f"wrote {sorted(p.name for p in path.iterdir())}")
        entries, metadata, _ = read_header(path / "model.safetensors")
        print(f"  metadata {metadata}, {len(entries)} tensors, e.g.")
        for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"):
            print(f"    {name:38s} {entries[name]['dtype']} {entries[name]['shape']}")
        print(f"  ours: h.0.attn.c_attn.weight {model.h[0].attn.c_attn.weight.shape} (Linear: out, in)")
        loaded = load_hf_gpt2(path)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 16))
    with mm.no_grad():
        difference = float(np.abs(model(ids).numpy() - loaded(ids).numpy()).max())
    print(f"loaded back: max |logits difference| = {difference}")
    return difference


def load_gpt2(directory: str, device: str):
    """(model, tokenizer) from a GPT-2 directory; its own tokenizer files, else GPT-2's in ../shared/data/gpt2."""
    read_config(directory)          # not a Hugging Face model directory: say that first
    tokenizer_spec = None
    has_own = (Path(directory) / "vocab.json").is_file() or (Path(directory) / "encoder.json").is_file()
    if not has_own and (SHARED_GPT2 / "encoder.json").is_file():
        tokenizer_spec = f"gpt2:{SHARED_GPT2}"
    elif not has_own and not (Path(directory) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory} has no tokenizer files (tokenizer.json, vocab.json + merges.txt, or "
                                f"encoder.json + vocab.bpe), nor has {SHARED_GPT2}: put GPT-2's in one of them")
    return load_pretrained(directory, tokenizer_spec, device)


def gpt2_demo(directory: str, model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Continue ``prompt`` with a real GPT-2 (greedy); returns the text."""
    print(f"GPT-2 from {directory}: {model.num_parameters():,} parameters")
    ids = tokenizer.encode(prompt)
    out = model.generate(np.asarray([ids]), max_new_tokens=max_new_tokens, temperature=0)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    return text


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gpt2_dir", nargs="?", help="a Hugging Face GPT-2 directory (optional)")
    parser.add_argument("--prompt", default="The meaning of life is")
    parser.add_argument("--max-new-tokens", type=positive_int, default=30)
    parser.add_argument("--device", type=device, default="cpu")
    args = parser.parse_args(argv)
    if args.gpt2_dir:                      # load it first: a wrong directory is said before any work
        try:
            gpt2 = load_gpt2(args.gpt2_dir, args.device)
        except (OSError, ValueError, RuntimeError) as error:   # missing, not GPT-2, no tokenizer files
            parser.error(str(error))
    difference = round_trip()
    assert difference == 0.0
    if args.gpt2_dir:
        gpt2_demo(args.gpt2_dir, *gpt2, args.prompt, args.max_new_tokens)
    return difference


if __name__ == "__main__":
    main()
