"""Example 8: fine-tune a pretrained GPT into a spam classifier (the book's chapter 6).

Start from the model that ``minillm train`` (no arguments) leaves in
runs/pydoc, put a 2-way head on its last real token, and train on the SMS Spam
Collection, balanced (747 spam, 747 ham) and split 70/10/20. With
``--ablation`` it also trains the other variants of the book's table: only the
head, the last block (the default), all layers, LoRA rank 16, and the same
model from random weights. Every run is a run directory like ``minillm
finetune classify`` writes (metrics.jsonl: train/val/test accuracy per epoch).
Ctrl-C stops after the current step; the run keeps its checkpoint (``minillm
finetune classify ... --resume`` continues it).

    minillm train                                    # once: runs/pydoc (about 2 minutes on an idle 2-core CPU)
    python examples/08_classify_spam.py              # last block + head, 5 epochs
    python examples/08_classify_spam.py --ablation   # the whole table (about 6 minutes)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import minillm as mm  # noqa: E402
from minillm.commands.argtypes import positive_float, positive_int  # noqa: E402
from minillm.finetune import FinetuneConfig, finetune, load_language_model  # noqa: E402
from minillm.models import GPT  # noqa: E402
from minillm.train import has_checkpoint  # noqa: E402

SOURCE = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"   # its file SMSSpamCollection

VARIANTS = {                         # name -> (FinetuneConfig fields, start from random weights)
    "head only": (dict(trainable="head"), False),
    "last block": (dict(trainable="last-block"), False),
    "all layers": (dict(trainable="all"), False),
    "LoRA r=16": (dict(lora_rank=16, lora_alpha=16), False),
    "random init, all layers": (dict(trainable="all"), True),
}


def variant_dir(name: str, args) -> Path:
    """Where a variant's run goes: OUT/last-block, OUT/LoRA-r16, ..."""
    return Path(args.out) / name.replace(" ", "-").replace("=", "").replace(",", "")


def train_variant(name: str, args) -> dict:
    fields, random_init = VARIANTS[name]
    gpt, tokenizer = load_language_model(args.base)
    mm.manual_seed(args.seed)                   # as `minillm finetune` does: the same head, the same numbers
    if random_init:
        gpt = GPT(gpt.config)
    config = FinetuneConfig("classify", str(args.data), epochs=args.epochs, balance=True, truncate=True, **fields)
    out = variant_dir(name, args)
    start = time.perf_counter()
    result = finetune(gpt, tokenizer, config, {"batch_size": args.batch_size, "lr": args.lr,
                                               "min_lr": args.lr / 10, "progress": not args.quiet,
                                               "seed": args.seed},
                      run_dir=out, say=lambda message: None if args.quiet else print(message))
    seconds = time.perf_counter() - start
    if result.interrupted:                      # Ctrl-C: the checkpoint is saved; no table, no next variant
        print(f"stopped at step {result.step}; the checkpoint is in {out}", file=sys.stderr)
        raise SystemExit(130)
    trainable = sum(p.size for p in result.model.parameters() if p.requires_grad)
    row = {"name": name, "seconds": seconds, "trainable": trainable, **result.metrics}
    print(f"{name:24s} train {row['train_acc']:.2%}  val {row['val_acc']:.2%}  test {row['test_acc']:.2%}  "
          f"({trainable:,} trainable, {seconds:.0f} s)", flush=True)
    return row


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(ROOT / "runs" / "pydoc"), help="the pretrained run (default runs/pydoc)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sms-spam-collection.tsv"),
                        help=f"label<TAB>text lines: the SMS Spam Collection (from {SOURCE})")
    parser.add_argument("--out", default=str(ROOT / "runs" / "spam"), help="folder for the run directories")
    parser.add_argument("--epochs", type=positive_int, default=5)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--lr", type=positive_float, default=5e-4)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--ablation", action="store_true", help="train all five variants and print the table")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not (Path(args.base) / "checkpoint.json").is_file():
        parser.error(f"no pretrained run in {args.base}: run `minillm train` first (it writes runs/pydoc)")
    if not Path(args.data).is_file():
        parser.error(f"no data file {args.data}: the SMS Spam Collection is in {SOURCE}; pass --data FILE")
    names = list(VARIANTS) if args.ablation else ["last block"]
    for name in names:
        if has_checkpoint(variant_dir(name, args)):
            parser.error(f"{variant_dir(name, args)} already holds a run: pass another --out (or delete it)")

    rows = [train_variant(name, args) for name in names]
    if len(rows) > 1:
        print("\n| variant | trainable parameters | train acc | val acc | test acc | wall time |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['name']} | {r['trainable']:,} | {r['train_acc']:.2%} | {r['val_acc']:.2%} | "
                  f"{r['test_acc']:.2%} | {r['seconds']:.0f} s |")
    return rows[names.index("last block")]["test_acc"]


if __name__ == "__main__":
    main()
