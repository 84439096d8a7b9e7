"""Example 10: LoRA, the low-rank adapter, on a GPT — counts, merging, and adapters saved alone.

    python examples/10_lora.py                          # gpt2-124m's shape (random weights), rank 16
    python examples/10_lora.py --preset tiny --rank 4   # small and instant

It wraps every Linear of the transformer blocks in a LoRALinear (the base
frozen, A random, B zero), then shows:

1. the trainable count equals Σ r·(in + out) over the adapted layers, a small
   fraction of the model;
2. with B = 0 the model is exactly the base model;
3. after a few training steps on random tokens, merging B A into the weights
   gives the same outputs as the unmerged adapters (one matrix again);
4. the adapters alone go to a safetensors file (9 MiB at gpt2-124m, r = 16, against 472 MiB), and
   loaded onto a fresh copy of the base model reproduce the trained outputs.

Spam classification with LoRA is ``examples/08_classify_spam.py --ablation``
or ``minillm finetune classify --lora-rank 16 ...``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm as mm  # noqa: E402
from minillm.commands.argtypes import positive_float, positive_int, preset  # noqa: E402
from minillm import functional as F, optim  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.nn.lora import (  # noqa: E402
    apply_lora, load_adapters, lora_layers, lora_parameter_count, merge_lora, save_adapters, unmerge_lora,
)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=preset, default="gpt2-124m")
    parser.add_argument("--context", type=positive_int, default=64, help="context length (smaller is faster)")
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--alpha", type=positive_float, default=16.0)
    parser.add_argument("--steps", type=positive_int, default=3)
    args = parser.parse_args(argv)

    mm.manual_seed(0)
    config = GPTConfig.from_preset(args.preset, context_length=args.context)
    base_state = {k: v.copy() for k, v in GPT(config).state_dict().items()}
    model = GPT(config)
    model.load_state_dict(base_state)
    total_before = model.num_parameters()
    names = apply_lora(model, rank=args.rank, alpha=args.alpha)

    # 1. the count
    formula = sum(args.rank * (layer.in_features + layer.out_features) for _, layer in lora_layers(model))
    trainable = model.num_parameters(trainable_only=True)
    assert trainable == formula == lora_parameter_count(model)
    print(f"{len(names)} adapted layers (e.g. {names[0]}); trainable {trainable:,} = sum r*(in+out), "
          f"{trainable / total_before:.2%} of the {total_before:,} base parameters")

    # 2. B = 0: the base model exactly
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, min(16, args.context)))
    base = GPT(config)
    base.load_state_dict(base_state)
    with mm.no_grad():
        assert np.array_equal(model(ids).numpy(), base(ids).numpy())
    print("before training, the adapted model's logits equal the base model's exactly (B = 0)")

    # 3. train a few steps, then merged == unmerged
    opt = optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    targets = np.roll(ids, -1, axis=1)
    for step in range(args.steps):
        loss = F.cross_entropy(model(ids), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"  step {step + 1}: loss {loss.item():.4f}")
    with mm.no_grad():
        unmerged = model(ids).numpy()
        merge_lora(model)
        merged = model(ids).numpy()
        unmerge_lora(model)
    difference = float(np.abs(merged - unmerged).max())
    print(f"merged vs unmerged logits: max |difference| {difference:.2e} (float32 rounding)")

    # 4. adapters alone, loaded onto a fresh base
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapters.safetensors"
        save_adapters(model, path)
        size = path.stat().st_size
        fresh = GPT(config)
        fresh.load_state_dict(base_state)
        load_adapters(fresh, path)
        with mm.no_grad():
            reloaded = fresh(ids).numpy()
    print(f"adapters file: {size / 1024:,.0f} KiB (the full model: {4 * total_before / 2**20:,.0f} MiB); "
          f"loaded onto a fresh base: max |difference| {np.abs(reloaded - unmerged).max():.1e}")
    assert np.array_equal(reloaded, unmerged)
    return difference


if __name__ == "__main__":
    main()
