"""Example 4: build a tiny GPT, run a forward pass, and check the loss at initialisation.

A freshly initialised GPT should be maximally unsure: its logits are nearly
equal, so the cross-entropy is close to ln(vocab_size). We also count the
parameters against the formula V·C + L·C + n_layer·(12C² + 13C) + 2C, and
take one backward pass to see every parameter get a gradient.

    python examples/04_gpt.py [--preset tiny]
"""

import argparse
import math

import numpy as np

import minillm as mm
from minillm.commands.argtypes import positive_int
from minillm.models import GPT, GPTConfig

# the GPT-2 family, whose count the formula below is (the Llama-style presets: example 12)
GPT2_PRESETS = ["tiny", "gpt2-124m", "gpt2-medium", "gpt2-large", "gpt2-xl"]


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=GPT2_PRESETS, help="the model's shape (default tiny)")
    parser.add_argument("--batch", type=positive_int, default=4, help="sequences in the batch (default 4)")
    parser.add_argument("--time", type=positive_int, default=32, help="tokens per sequence (default 32)")
    args = parser.parse_args(argv)

    mm.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset)
    model = GPT(cfg)
    print(cfg)
    print(model)

    C, V, L = cfg.d_model, cfg.vocab_size, cfg.context_length
    formula = V * C + L * C + cfg.n_layer * (12 * C * C + 13 * C) + 2 * C
    print(f"\nparameters: {model.num_parameters():,} (formula: {formula:,})")
    for name, p in list(model.named_parameters())[:6]:
        print(f"  {name:<24} {tuple(p.shape)}")
    print("  ...")

    T = min(args.time, L)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (args.batch, T))           # (B, T) token ids
    targets = rng.integers(0, V, (args.batch, T))       # what should come next
    logits, loss = model(ids, targets)
    print(f"\nids {ids.shape} -> logits {logits.shape}")
    print(f"loss at init {loss.item():.4f}, ln(vocab_size) = {math.log(V):.4f}")

    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    total = len(list(model.parameters()))
    print(f"parameters with a gradient: {total - len(missing)} of {total}")
    return loss.item()


if __name__ == "__main__":
    main()
